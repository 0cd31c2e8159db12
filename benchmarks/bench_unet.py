"""Speed of the paper's U-Net on this machine: forward time of one 512 x 512 slice with 89 frames
and training throughput (slices/s) at 128 and 512, with the FLOPs per slice and achieved GFLOP/s.

    python benchmarks/bench_unet.py [--width 64] [--frames 89] [--kernel 2] [--device cpu]
        [--amp none|bf16|fp16] [--batch 2]

``--amp`` times the passes under autocast, as training runs them on a GPU (``TrainConfig.amp``);
``--batch`` is the training batch at 512 x 512 (8 at 128 x 128; the paper trained with 8).
The last line is the paper's schedule (250 epochs at 128 x 128, then 50 at 512 x 512) over 800
training slices an epoch, at the measured rates.

Training FLOPs are taken as 3 x forward (forward + backward through activations and weights).
Timings on a shared machine are noisy: run it twice and compare.
"""

from __future__ import annotations

import argparse
import resource
import time
from contextlib import nullcontext

import torch

from ctperf.model import UNet, masked_mse, unet_flops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def forward_time(net: UNet, *, frames: int, size: int, device: torch.device,
                 repeats: int, amp: str = "none") -> float:
    x = torch.randn(1, frames, size, size, device=device)
    net.eval()
    with torch.no_grad(), _autocast(device, amp):
        net(x)  # warm-up
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return min(times)


def train_throughput(net: UNet, *, frames: int, size: int, batch: int, steps: int,
                     device: torch.device, amp: str = "none") -> float:
    x = torch.randn(batch, frames, size, size, device=device)
    y = torch.rand(batch, 1, size, size, device=device)
    m = torch.ones(batch, 1, size, size, device=device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    net.train()

    def step() -> None:
        with _autocast(device, amp):
            loss = masked_mse(net(x), y, m)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    step()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--frames", type=int, default=89)
    ap.add_argument("--kernel", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per size")
    ap.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    ap.add_argument("--batch", type=int, default=2, help="training batch at 512 x 512")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = UNet(args.frames, width=args.width, kernel_size=args.kernel).to(device)
    cfg = {"in_frames": args.frames, "width": args.width, "kernel_size": args.kernel}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "unknown CPU") if device.type == "cpu" else ""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    print(f"device {device} {cpu}{gpu}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, autocast {args.amp}")
    print(f"U-Net width {args.width}, {args.kernel} x {args.kernel} kernels, t = {args.frames}: "
          f"{net.n_parameters():,} parameters")
    for k in (2, 3):
        f = unet_flops(**{**cfg, "kernel_size": k}, size=512) / 1e9
        print(f"  FLOPs per 512 x 512 slice, {k} x {k} kernels: {f:.1f} GFLOP")
    f512 = unet_flops(**cfg, size=512)
    t = forward_time(net, frames=args.frames, size=512, device=device, repeats=args.repeats,
                     amp=args.amp)
    print(f"forward, one 512 x 512 x {args.frames} slice: {t:.3f} s "
          f"({f512 / t / 1e9:.1f} GFLOP/s)")
    epoch_min = {}
    for size, batch in ((128, 8), (512, args.batch)):
        rate = train_throughput(net, frames=args.frames, size=size, batch=batch,
                                steps=args.steps, device=device, amp=args.amp)
        flops = 3 * unet_flops(**cfg, size=size)
        epoch_min[size] = 800 / rate / 60
        print(f"training at {size} x {size} (batch {batch}): {rate:.2f} slices/s, "
              f"{flops / 1e9:.1f} GFLOP per slice, {rate * flops / 1e9:.1f} GFLOP/s")
        print(f"  -> one epoch of 800 slices (100 patients x 8): {epoch_min[size]:.1f} min")
    hours = (250 * epoch_min[128] + 50 * epoch_min[512]) / 60
    print(f"paper schedule (250 epochs at 128, 50 at 512, 800 slices an epoch): {hours:.1f} h "
          "per network")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak resident memory: {rss:.1f} GiB")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 1024**3:.1f} GiB")


if __name__ == "__main__":
    main()

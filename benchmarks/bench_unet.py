"""Speed of the paper's U-Net on this machine: forward time of one 512 x 512 slice with 89 frames
and training throughput (slices/s) at 128 and 512, with the FLOPs per slice and achieved GFLOP/s.

    python benchmarks/bench_unet.py [--width 64] [--frames 89] [--kernel 2] [--device cpu]

Training FLOPs are taken as 3 x forward (forward + backward through activations and weights).
Timings on a shared machine are noisy: run it twice and compare.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from ctperf.model import UNet, masked_mse, unet_flops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_time(net: UNet, *, frames: int, size: int, device: torch.device,
                 repeats: int) -> float:
    x = torch.randn(1, frames, size, size, device=device)
    net.eval()
    with torch.no_grad():
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
                     device: torch.device) -> float:
    x = torch.randn(batch, frames, size, size, device=device)
    y = torch.rand(batch, 1, size, size, device=device)
    m = torch.ones(batch, 1, size, size, device=device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-5)
    net.train()

    def step() -> None:
        loss = masked_mse(net(x), y, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

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
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = UNet(args.frames, width=args.width, kernel_size=args.kernel).to(device)
    cfg = {"in_frames": args.frames, "width": args.width, "kernel_size": args.kernel}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "unknown CPU") if device.type == "cpu" else ""
    print(f"device {device} {cpu}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    print(f"U-Net width {args.width}, {args.kernel} x {args.kernel} kernels, t = {args.frames}: "
          f"{net.n_parameters():,} parameters")
    for k in (2, 3):
        f = unet_flops(**{**cfg, "kernel_size": k}, size=512) / 1e9
        print(f"  FLOPs per 512 x 512 slice, {k} x {k} kernels: {f:.1f} GFLOP")
    f512 = unet_flops(**cfg, size=512)
    t = forward_time(net, frames=args.frames, size=512, device=device, repeats=args.repeats)
    print(f"forward, one 512 x 512 x {args.frames} slice: {t:.2f} s "
          f"({f512 / t / 1e9:.1f} GFLOP/s)")
    for size, batch in ((128, 8), (512, 2)):
        rate = train_throughput(net, frames=args.frames, size=size, batch=batch,
                                steps=args.steps, device=device)
        flops = 3 * unet_flops(**cfg, size=size)
        print(f"training at {size} x {size} (batch {batch}): {rate:.2f} slices/s, "
              f"{flops / 1e9:.1f} GFLOP per slice, {rate * flops / 1e9:.1f} GFLOP/s")
        print(f"  -> one epoch of 800 slices (100 patients x 8): {800 / rate / 60:.1f} min")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak resident memory: {rss:.1f} GiB")


if __name__ == "__main__":
    main()

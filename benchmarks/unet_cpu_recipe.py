"""The U-Net's CPU recipe on a small phantom cohort: prepare the cohort, cross-validate, score.

Two steps, each a sub-command:

``prepare OUT``
    Generates a phantom cohort in ``OUT/raw`` and writes ``OUT/filtered``: the same subjects with
    the study passed through the paper's bilateral filter (3 mm, 20 HU; the cohort has no motion,
    so no registration) and the box-model NLR maps of the filtered study in ``nlr/`` (computed
    with the phantom's noise-free AIF and VOF, since automatic AIF selection finds no artery at
    this pixel size). ``truth/`` and ``masks/`` are copied.

``cv OUT --targets cbv,cbf,delay --reference nlr --preset cpu``
    Threefold cross-validation over patients with :func:`ctperf.model.cross_validate` and the
    named preset of :data:`ctperf.model.train.PRESETS` (several targets: one model with one
    output per target), then every patient is predicted by its fold's model and compared
    voxel-wise (brain mask) with the NLR reference and the truth: Pearson r, MAE and bias,
    pooled over all patients. Writes ``OUT/cv-<targets>-<reference>-<preset>/scores.json`` and
    prints Markdown rows.

Run with ``OMP_NUM_THREADS=2 nice -n 15 python benchmarks/unet_cpu_recipe.py ...``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np


def prepare(out: Path, *, subjects: int, size: int, slices: int, seed: int) -> None:
    from ctperf import io
    from ctperf.perfusion import compute_maps
    from ctperf.preprocess.bilateral import bilateral_filter
    from ctperf.workflow import generate_cohort

    raw, filt = out / "raw", out / "filtered"
    t0 = time.perf_counter()
    generate_cohort(raw, subjects=subjects, seed=seed, size=size, slices=slices, frames=89,
                    frame_interval=0.5, dicom=False)
    print(f"generated {subjects} subjects in {time.perf_counter() - t0:.0f} s", flush=True)
    for sub in sorted(raw.glob("sub-*")):
        dst = filt / sub.name
        if (dst / "nlr" / "delay.nii.gz").exists():
            continue
        t1 = time.perf_counter()
        series = io.read_nifti_series(sub / "study.nii.gz")
        filtered = bilateral_filter(series, spatial_sigma_mm=3.0, range_sigma_hu=20.0)
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("truth", "masks"):
            shutil.copytree(sub / name, dst / name, dirs_exist_ok=True)
        shutil.copy2(sub / "curves.json", dst / "curves.json")
        io.write_series_nifti(filtered, dst / "study.nii.gz")
        mask = io.read_mask(sub / "masks" / "brain.nii.gz", shape=series.shape[1:],
                            affine=series.affine)
        curves = json.loads((sub / "curves.json").read_text())
        maps = compute_maps(filtered, method="nlr", brain_mask=mask, aif=np.asarray(curves["aif"]),
                            vof=np.asarray(curves["vof"]))
        io.write_maps_nifti(maps, dst / "nlr")
        print(f"{sub.name}: filtered + NLR in {time.perf_counter() - t1:.1f} s", flush=True)


def _scores(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(pred) & np.isfinite(ref)
    p, r = pred[ok].astype(np.float64), ref[ok].astype(np.float64)
    return {"r": float(np.corrcoef(p, r)[0, 1]), "mae": float(np.mean(np.abs(p - r))),
            "bias": float(np.mean(p - r)), "ref_mean": float(r.mean()),
            "ref_sd": float(r.std()), "pred_sd": float(p.std()), "n": int(ok.sum())}


def cv(out: Path, *, targets: list[str], reference: str, preset: str, folds: int, seed: int,
       overrides: dict[str, object]) -> dict[str, object]:
    import torch

    from ctperf import io
    from ctperf.model import TARGET_MAPS, build_slice_cache, cross_validate, make_folds
    from ctperf.model.predict import predict_maps
    from ctperf.model.train import PRESETS

    cohort = out / "filtered"
    config = replace(PRESETS[preset], targets=tuple(targets), seed=seed, device="cpu",
                     **overrides)
    size, frames = config.size, config.frames
    pre_size = config.pretrain_size if config.pretrain_epochs > 0 else 0
    opts = asdict(config)
    torch.set_num_threads(2)
    cache = build_slice_cache(cohort, out / "cache", size=size, frames=frames,
                              reference=reference)
    pre = (build_slice_cache(cohort, out / "cache", size=pre_size, frames=frames,
                             reference=reference) if pre_size else None)
    run = out / f"cv-{'+'.join(targets)}-{reference}-{preset}"
    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    rows = cross_validate(cache, run, config, folds=folds, pretrain_cache=pre)
    seconds = time.perf_counter() - t0
    names = [TARGET_MAPS[t] for t in targets]
    got: dict[str, list[list[np.ndarray]]] = {n: [[], [], []] for n in names}
    for k, (_, val) in enumerate(make_folds(cache.patient_ids, k=folds, seed=seed), start=1):
        ckpt = run / f"fold-{k}" / "model.pt"
        for pid in val:
            sub = cohort / pid
            series = io.read_nifti_series(sub / "study.nii.gz")
            mask = io.read_mask(sub / "masks" / "brain.nii.gz", shape=series.shape[1:],
                                affine=series.affine)
            pred = predict_maps(series, ckpt, device="cpu", resize=True)
            ref, truth = io.read_maps(sub / reference), io.read_maps(sub / "truth")
            for n in names:
                got[n][0].append(pred[n][mask])
                got[n][1].append(ref[n][mask])
                got[n][2].append(truth[n][mask] if n in truth.names
                                 else np.full(mask.sum(), np.nan))
    result: dict[str, object] = {
        "targets": targets, "reference": reference, "preset": preset, "options": opts,
        "size": size, "frames": frames, "pretrain_size": pre_size, "train_seconds": seconds,
        "table1": rows, "maps": {}}
    print("| map | r vs ref | MAE vs ref | bias vs ref | r vs truth | MAE vs truth | "
          "ref vs truth r |", flush=True)
    for n in names:
        p, r, t = (np.concatenate(a) for a in got[n])
        entry = {"vs_reference": _scores(p, r)}
        if np.isfinite(t).any():
            entry["vs_truth"] = _scores(p, t)
            entry["reference_vs_truth"] = _scores(r, t)
        result["maps"][n] = entry  # type: ignore[index]
        s, tt, rt = (entry.get(k, {"r": np.nan, "mae": np.nan, "bias": np.nan})
                     for k in ("vs_reference", "vs_truth", "reference_vs_truth"))
        print(f"| {n} | {s['r']:.3f} | {s['mae']:.3g} | {s['bias']:+.3g} | {tt['r']:.3f} | "
              f"{tt['mae']:.3g} | {rt['r']:.3f} |", flush=True)
    print(f"training of {folds} folds: {seconds:.0f} s", flush=True)
    (run / "scores.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out", type=Path)
    p.add_argument("--subjects", type=int, default=15)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--seed", type=int, default=2026)
    c = sub.add_parser("cv")
    c.add_argument("out", type=Path)
    c.add_argument("--targets", default="cbv,cbf,delay")
    c.add_argument("--reference", default="nlr", choices=("nlr", "truth"))
    c.add_argument("--preset", default="cpu")
    c.add_argument("--folds", type=int, default=3)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset option (value parsed as JSON)")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.out, subjects=a.subjects, size=a.size, slices=a.slices, seed=a.seed)
    else:
        overrides = {}
        for kv in a.set:
            k, _, v = kv.partition("=")
            overrides[k] = json.loads(v)
        cv(a.out, targets=a.targets.split(","), reference=a.reference, preset=a.preset,
           folds=a.folds, seed=a.seed, overrides=overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())

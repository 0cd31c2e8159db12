"""K-fold cross-validation over patients (never slices) and the paper's Table 1.

Folds are drawn from a seed: the patient ids are sorted, shuffled with ``numpy.random.default_rng
(seed)`` and split into K nearly equal groups; fold k validates on group k and trains on the rest.
Patients on an optional held-out test list take part in no fold.

Table 1 gives the MSE on [0, 1] maps two ways. ``*_mse``: ctperf's fixed windows per map (the
network's targets, ``ctperf.model.normalise``). ``*_mse_paper``: the authors' normalisation, each
map scaled by its min-max over the whole data set and whole images (background included); on the
cached targets this is the window MSE times ``((high - low) / (max - min))**2`` (exact where the
reference lies inside the window; the cache holds window-clipped targets).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctperf.errors import ValidationError
from ctperf.model.data import SliceCache
from ctperf.model.train import TrainConfig

__all__ = ["cross_validate", "format_table", "make_folds", "paper_scale"]

log = logging.getLogger(__name__)


def make_folds(patients: Sequence[str], *, k: int = 3, seed: int = 0,
               test_patients: Sequence[str] = ()) -> list[tuple[list[str], list[str]]]:
    """Split patients into K (train, validation) pairs; each patient validates exactly once.

    Parameters
    ----------
    patients : sequence of str
        Patient ids (duplicates are an error).
    k : int
        Number of folds, 2 <= k <= number of patients left after removing the test list.
    seed : int
        Seed of the shuffle.
    test_patients : sequence of str
        Held-out patients, excluded from every fold.

    Returns
    -------
    list of (train ids, validation ids)
    """
    if len(set(patients)) != len(patients):
        raise ValidationError("patient ids must be unique")
    unknown = set(test_patients) - set(patients)
    if unknown:
        raise ValidationError(f"test patients not in the cohort: {sorted(unknown)}")
    pool = sorted(set(patients) - set(test_patients))
    if len(pool) < 2:
        raise ValidationError(f"cross-validation needs at least 2 patients (after the test "
                              f"list), the cohort has {len(pool)}")
    if not 2 <= k <= len(pool):
        raise ValidationError(f"folds must be 2 to {len(pool)} (one patient per fold at most), "
                              f"got {k}")
    shuffled = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    groups = [list(g) for g in np.array_split(np.asarray(shuffled, dtype=object), k)]
    return [([p for j, g in enumerate(groups) if j != i for p in g], groups[i])
            for i in range(k)]


def paper_scale(meta: dict[str, Any], target: str) -> float | None:
    """Factor from ctperf's window MSE to the paper's min-max MSE for one target.

    ``((high - low) / (max - min))**2`` with the target's window and its dataset-wide range as
    recorded in a slice cache's ``meta`` (``windows``, ``image_ranges``:
    :func:`~ctperf.evaluation.metrics.image_range`); None when the cache has no range (built
    by a ctperf before 2026-12-05, whose ranges left the background out) or it is empty.
    """
    if "image_ranges" not in meta and "target_ranges" in meta:
        log.warning("the slice cache was built before 2026-12-05: its ranges leave the "
                    "background out, so the paper's MSE columns stay empty; delete the cache "
                    "to rebuild it")
    lo_hi = meta.get("image_ranges", {}).get(target)
    window = meta.get("windows", {}).get(target)
    if not lo_hi or not window or not lo_hi[1] > lo_hi[0]:
        return None
    return float(((window[1] - window[0]) / (lo_hi[1] - lo_hi[0])) ** 2)


def format_table(rows: Sequence[dict[str, Any]], *, target: str) -> str:
    """Markdown Table 1: per-fold train, validation (and test, when the rows have it) MSE on
    [0, 1] maps, then mean +- SD.

    Columns: ctperf's fixed windows (``train_mse``, ``val_mse``, ``test_mse``) and, when the
    rows have them, the paper's dataset min-max normalisation (``*_mse_paper``), with a note
    on what clipping to the windows does to it.
    """
    splits = [("train", "train"), ("val", "validation")]
    if all(r.get("test_mse") is not None for r in rows):
        splits.append(("test", "test"))
    paper = all(r.get(f"{s}_mse_paper") is not None for r in rows for s, _ in splits)
    cols = [(f"{s}_mse", f"{name} MSE (ctperf windows)") for s, name in splits]
    if paper:
        cols += [(f"{s}_mse_paper", f"{name} MSE (paper min-max*)") for s, name in splits]
    lines = [f"| {target.upper()} fold | " + " | ".join(c[1] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['fold']} | " + " | ".join(f"{r[c]:.4f}" for c, _ in cols) + " |")
    sd = (lambda a: float(np.std(a, ddof=1)) if len(a) > 1 else 0.0)  # noqa: E731
    stats = [np.array([r[c] for r in rows], dtype=np.float64) for c, _ in cols]
    lines.append("| mean +- SD | " + " | ".join(f"{a.mean():.4f} +- {sd(a):.4f}"
                                              for a in stats) + " |")
    if paper:
        lines.append("\n*The window MSE rescaled to the dataset's min-max range: references "
                     "beyond a window count at its edge, so where they often lie beyond it (NLR "
                     "CBF above 100 mL/100g/min) this reads low; `ctperf evaluate` scores the "
                     "maps themselves (`mse_minmax`).")
    return "\n".join(lines) + "\n"


def cross_validate(cache: SliceCache, out: str | Path, config: TrainConfig | None = None, *,
                   folds: int = 3, test_patients: Sequence[str] = (),
                   pretrain_cache: SliceCache | None = None, resume: bool = False,
                   progress: bool = False) -> list[dict[str, Any]]:
    """Train one model per fold in ``out/fold-<k>`` and write Table 1 as CSV and Markdown.

    Train and validation MSE are evaluated after training with the final weights in eval mode,
    on [0, 1] maps over the brain mask (or all voxels when ``config.masked_loss`` is False); with
    a test list the test MSE of each fold's model is reported as well.

    Parameters
    ----------
    cache : SliceCache
        Slices at the final size.
    out : path
        Output folder: ``fold-<k>/`` per fold, ``table1.csv``, ``table1.md``.
    config : TrainConfig, optional
        Settings of every fold's training (:func:`ctperf.model.train`; default
        ``TrainConfig()``); ``config.seed`` also draws the folds.
    folds, test_patients
        See :func:`make_folds`.
    pretrain_cache, resume, progress
        Passed to :func:`ctperf.model.train` for every fold, finished ones included: a fold
        whose checkpoint was trained on another split or with other settings is refused.

    Returns
    -------
    list of dict
        One row per fold: fold, n_train, n_val, train_mse, val_mse (and test_mse).
    """
    import torch

    from ctperf.io import atomic_file
    from ctperf.model.checkpoint import build_model, load_checkpoint
    from ctperf.model.train import evaluate_mse, resolve_device, train

    out = Path(out)
    config = config or TrainConfig()
    device = resolve_device(config.device)
    targets = config.targets
    rows: list[dict[str, Any]] = []
    for i, (tr, va) in enumerate(make_folds(cache.patient_ids, k=folds, seed=config.seed,
                                            test_patients=test_patients), start=1):
        log.info("fold %d/%d: %d train, %d validation patients", i, folds, len(tr), len(va))
        fold_dir = out / f"fold-{i}"
        # a finished fold too goes through train's resume: it refuses a checkpoint trained on
        # another split or with other settings (reused unchecked, a fold's model had been
        # scored on validation patients it trained on), and has no epoch left to run
        result_path = train(cache, fold_dir, config, train_patients=tr, val_patients=va,
                            pretrain_cache=pretrain_cache, resume=resume,
                            progress=progress).model_path
        ckpt = load_checkpoint(result_path)
        model = build_model(ckpt["config"])
        model.load_state_dict(ckpt["model"])
        model.to(device)
        cfg = ckpt["config"]
        kw = {"target_idx": [cache.target_index(t) for t in targets], "mean": cfg["hu_mean"],
              "std": cfg["hu_std"], "masked": cfg["masked_loss"], "device": device}
        row: dict[str, Any] = {"fold": i, "n_train": len(tr), "n_val": len(va)}
        splits = {"train": tr, "val": va, **({"test": list(test_patients)} if test_patients
                                             else {})}
        scales = [paper_scale(cache.meta, t) for t in targets]
        with torch.no_grad():
            for split, patients in splits.items():
                row[f"{split}_mse"] = evaluate_mse(model, cache, cache.rows(patients), **kw)
            for split, patients in splits.items():
                row[f"{split}_mse_paper"] = _paper_mse(
                    model, cache, cache.rows(patients), row[f"{split}_mse"], scales, kw)
        rows.append(row)
    if int(os.environ.get("RANK", "0")) > 0:
        return rows  # under torchrun only process 0 writes the table
    target = "+".join(targets)
    cols = list(rows[0])  # None (no range in an old cache) is written as an empty cell
    with atomic_file(out / "table1.csv") as tmp:
        tmp.write_text(",".join(cols) + "\n" + "".join(
            ",".join("" if r[c] is None else str(r[c]) for c in cols) + "\n" for r in rows))
    with atomic_file(out / "table1.md") as tmp:
        tmp.write_text(format_table(rows, target=target))
    return rows


def _paper_mse(model: Any, cache: SliceCache, rows: np.ndarray, window_mse: float,
               scales: Sequence[float | None], kw: dict[str, Any]) -> float | None:
    """The paper's min-max MSE from the window MSE: scaled per target, then averaged.

    Every target has the same loss mask, so the pooled MSE is the mean of the per-target ones;
    with several targets each one's MSE needs its own pass (one output channel at a time).
    """
    import torch

    from ctperf.model.train import evaluate_mse

    known = [float(s) for s in scales if s is not None]
    if len(known) < len(scales):
        return None
    if len(known) == 1:
        return window_mse * known[0]

    class _Channel(torch.nn.Module):
        def __init__(self, net: torch.nn.Module, c: int) -> None:
            super().__init__()
            self.net, self.c = net, c

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)[:, self.c:self.c + 1]

    per_target = []
    for c, scale in enumerate(known):
        one = {**kw, "target_idx": [kw["target_idx"][c]]}
        per_target.append(evaluate_mse(_Channel(model, c), cache, rows, **one) * scale)
    return float(np.mean(per_target))

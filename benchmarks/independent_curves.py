"""Bias of every method on CT-like curves from a forward model independent of ctperf's phantom.

The curves are made here, from the indicator-dilution equation and nothing of ctperf: a
gamma-variate arterial bolus (shape 3, scale 2 s, first pass about 8 s wide, peak 250-450 HU
above a 40 HU baseline) with a 15 % recirculation, delayed (-1 to 8 s) and dispersed by an
exponential kernel (0.05-3 s), convolved with a box, exponential, gamma (shape 3) or linear
residue on a 0.01 s grid, scaled by rho / kH * CBF / 6000 onto a 35 HU baseline, and sampled
every 1 s for 60 s, every 2 s for 90 s, or every 1 s for 30 s then every 3 s to 70 s. Four
tissue classes (healthy grey matter, white matter, penumbra, core; 15 curves each per file).
The true Tmax follows the package's convention: the delay plus the first time the dispersed
residue comes within 1e-3 of its peak (docs/methods.md). Noise: none, or 3 HU white noise on
every curve, the AIF's too.

Each file goes through :func:`ctperf.perfusion.fit_curves` (what ``ctperf curves`` runs) with
the automatic baseline, and the table prints the median relative error of CBF, CBV and MTT
(half the interquartile range in brackets) and the median Tmax error in s per method, residue
and noise, pooled over the samplings. Run: ``python benchmarks/independent_curves.py``
(about 3 minutes on 2 cores; ``--methods bsvd nlr-fast`` for fewer).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats

from ctperf.perfusion import fit_curves
from ctperf.perfusion.maps import METHODS

RHO, KH = 1.04, (1 - 0.45) / (1 - 0.25)
FINE_S = 0.01
RESIDUES = ("box", "exponential", "gamma", "linear")
SAMPLINGS = {"1 s, 60 s": np.arange(0.0, 60.5, 1.0),
             "2 s, 90 s": np.arange(0.0, 90.5, 2.0),
             "1 s then 3 s, 70 s": np.concatenate([np.arange(0.0, 30.0, 1.0),
                                                    np.arange(30.0, 70.5, 3.0)])}
# CBF mL/100 g/min, MTT s, delay s, dispersion s: ranges drawn uniformly per class
CLASSES = {"grey matter": ((40, 70), (3, 5), (-1, 1.5), (0.05, 0.5)),
           "white matter": ((18, 30), (4, 6), (0, 2), (0.05, 0.5)),
           "penumbra": ((12, 30), (6, 12), (2, 8), (0.5, 3)),
           "core": ((4, 12), (8, 16), (4, 8), (1, 3))}


def gamma_variate(t: np.ndarray, start: float, shape: float, scale: float) -> np.ndarray:
    x = np.clip(t - start, 0.0, None)
    g = x ** shape * np.exp(-x / scale)
    return g / g.max()


def arterial(t: np.ndarray, *, start: float, peak: float) -> np.ndarray:
    """HU above baseline: first pass (shape 3, scale 2 s) and a wider 15 % recirculation."""
    return peak * (gamma_variate(t, start, 3.0, 2.0)
                   + 0.15 * gamma_variate(t, start + 14.0, 3.0, 3.0))


def residue(kind: str, t: np.ndarray, mtt: float) -> np.ndarray:
    if kind == "box":
        return (t < mtt).astype(float)
    if kind == "exponential":
        return np.exp(-t / mtt)
    if kind == "gamma":  # transit times gamma-distributed (shape 3) with mean MTT
        return stats.gamma.sf(t, 3.0, scale=mtt / 3.0)
    if kind == "linear":  # transit times uniform on [0, 2 MTT)
        return np.clip(1.0 - t / (2.0 * mtt), 0.0, None)
    raise ValueError(kind)


def dispersed_residue(kind: str, t: np.ndarray, mtt: float, tau: float) -> np.ndarray:
    kernel = np.exp(-t / tau) / tau
    return np.convolve(kernel, residue(kind, t, mtt))[: t.size] * FINE_S


def true_tmax(kind: str, mtt: float, delay: float, tau: float) -> float:
    t = np.arange(0.0, 200.0, FINE_S)
    hr = dispersed_residue(kind, t, mtt, tau)
    return delay + float(t[np.argmax(hr >= hr.max() * (1 - 1e-3))])


def simulate(kind: str, times: np.ndarray, params: list[dict[str, float]], *,
             rng: np.random.Generator, noise_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """(AIF (T,), tissue (T, N)) in HU at ``times``."""
    fine = np.arange(0.0, times[-1] + 20.0, FINE_S)
    start, peak = rng.uniform(5.0, 9.0), rng.uniform(250.0, 450.0)
    at = np.round(times / FINE_S).astype(int)
    curves = []
    for p in params:
        delayed = arterial(fine - p["delay"], start=start, peak=peak)
        conv = np.convolve(delayed, dispersed_residue(kind, fine, p["mtt"], p["tau"]))
        curves.append(35.0 + RHO / KH * p["cbf"] / 6000.0 * conv[: fine.size][at] * FINE_S)
    aif = 40.0 + arterial(fine, start=start, peak=peak)[at]
    tissue = np.stack(curves, axis=1)
    if noise_hu:
        aif = aif + rng.normal(0.0, noise_hu, aif.shape)
        tissue = tissue + rng.normal(0.0, noise_hu, tissue.shape)
    return aif, tissue


def draw(rng: np.random.Generator, per_class: int) -> list[dict[str, float]]:
    return [{"cbf": rng.uniform(*c), "mtt": rng.uniform(*m), "delay": rng.uniform(*d),
             "tau": rng.uniform(*s)}
            for c, m, d, s in CLASSES.values() for _ in range(per_class)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--per-class", type=int, default=15)
    args = parser.parse_args()
    errors: dict[tuple[str, str, float], dict[str, list[float]]] = {}
    seconds: dict[str, float] = dict.fromkeys(args.methods, 0.0)
    for r, kind in enumerate(RESIDUES):
        for s, times in enumerate(SAMPLINGS.values()):
            for noise in (0.0, 3.0):
                rng = np.random.default_rng([r, s, int(noise)])
                params = draw(rng, args.per_class)
                aif, tissue = simulate(kind, times, params, rng=rng, noise_hu=noise)
                truth = {q: np.array([p[q] for p in params]) for q in ("cbf", "mtt")}
                truth["cbv"] = truth["cbf"] * truth["mtt"] / 60.0
                tmax = np.array([true_tmax(kind, p["mtt"], p["delay"], p["tau"])
                                 for p in params])
                for method in args.methods:
                    start = time.perf_counter()
                    fit = fit_curves(tissue, aif, times, method=method, rho=RHO, kh=KH)
                    seconds[method] += time.perf_counter() - start
                    e = errors.setdefault((method, kind, noise),
                                          {"cbf": [], "cbv": [], "mtt": [], "tmax": []})
                    for q in ("cbf", "cbv", "mtt"):
                        e[q] += list(100.0 * (getattr(fit, q) / truth[q] - 1.0))
                    e["tmax"] += list(fit.tmax - tmax)
    print("method | residue | noise HU | CBF % | CBV % | MTT % | Tmax s")
    for (method, kind, noise), e in errors.items():
        cells = []
        for q in ("cbf", "cbv", "mtt"):
            v = np.asarray(e[q])
            v = v[np.isfinite(v)]  # SVD: no MTT where CBV <= 0
            q1, q2, q3 = np.percentile(v, [25, 50, 75])
            cells.append(f"{q2:+.0f} ({(q3 - q1) / 2:.0f})")
        cells.append(f"{np.nanmedian(e['tmax']):+.1f}")
        print(f"{method} | {kind} | {noise:g} | " + " | ".join(cells))
    n = len(RESIDUES) * len(SAMPLINGS) * 2 * 4 * args.per_class
    print("fit time per curve, ms: " + ", ".join(f"{m} {1e3 * t / n:.2f}"
                                                 for m, t in seconds.items()))


if __name__ == "__main__":
    main()

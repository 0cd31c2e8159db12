"""How far one tissue curve tells the residue's shape: the exact posterior over bayes's whole grid.

One box and one exponential residue (CBF 50, MTT 4 s, delay 1 s, and CBF 20, MTT 8 s,
delay 3 s) are convolved with a gamma-variate AIF on a 0.01 s grid (not ctperf's phantom or
its grid's responses) and sampled every second for 60 s; Gaussian noise of 0.5 and 2 HU is
added, ``--draws`` times. For each noisy curve the posterior of ``fit_bayes`` without the
spatial prior is evaluated on every point of the grid (no coarse-to-fine search), and the
script prints, averaged over the draws: the posterior mass of each residue shape, the posterior
mean MTT within each shape (median over the draws), the posterior mean MTT over all shapes and
the MTT of the single most probable grid point (medians); each with bayes's prior (the
log-normal on MTT with the Jeffreys factor) and with the plain log-normal, on the same draws.

Usage: ``python benchmarks/bench_bayes_identifiability.py [--draws 20]``.
"""

from __future__ import annotations

import argparse

import numpy as np

from ctperf.perfusion import flow_scale
from ctperf.perfusion.bayes import ResidueGrid

FINE = 0.01
TIMES = np.arange(0.0, 60.0, 1.0)
CASES = (("box", 50.0, 4.0, 1.0), ("exponential", 50.0, 4.0, 1.0),
         ("box", 20.0, 8.0, 3.0), ("exponential", 20.0, 8.0, 3.0))


def arterial(t: np.ndarray) -> np.ndarray:
    x = np.clip(t - 8.0, 0.0, None) / 4.5
    c = x**3 * np.exp(-(x - 1.0) * 3.0)
    return 400.0 * c / c.max()


def tissue(shape: str, cbf: float, mtt: float, delay: float) -> np.ndarray:
    fine = np.arange(0.0, TIMES[-1] + 1.0, FINE)
    r = np.exp(-fine / mtt) if shape == "exponential" else (fine < mtt).astype(float)
    ca = np.interp(fine - delay, fine, arterial(fine), left=0.0)
    c = flow_scale(1.04, 0.733) * cbf * np.convolve(ca, r)[: fine.size] * FINE
    return np.interp(TIMES, fine, c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args()
    grid = ResidueGrid(arterial(TIMES), TIMES, scale=flow_scale(1.04, 0.733))
    priors = {name: grid.log_prior(5.0, 1.0, jeffreys=j).astype(np.float64)
              for name, j in (("Jeffreys", True), ("plain", False))}
    n_shapes = grid.dims[0]
    rng = np.random.default_rng(0)
    print("shapes:", ", ".join(grid.residues), "| prior on MTT: the log-normal with the "
          "Jeffreys factor (bayes's), and plain; the same noise draws for both")
    for shape, cbf, mtt, delay in CASES:
        clean = tissue(shape, cbf, mtt, delay)
        for noise in (0.5, 2.0):
            ys = clean + rng.normal(0.0, noise, (args.draws, clean.size))
            g = np.maximum(ys @ grid.responses.T.astype(np.float64), 0.0)  # (draws, K)
            explained = g**2 * grid.inv_norm2 * 0.5 / noise**2
            for name, log_prior in priors.items():
                lp = explained + log_prior
                w = np.exp(lp - lp.max(axis=1, keepdims=True))
                w /= w.sum(axis=1, keepdims=True)
                ws = w.reshape(args.draws, n_shapes, -1)
                ms = grid.mtt.reshape(n_shapes, -1)
                mass = ws.sum(axis=2)
                within = (ws * ms).sum(axis=2) / mass
                mean = w @ grid.mtt
                best = grid.mtt[np.argmax(lp, axis=1)]
                print(f"{shape:11s} MTT {mtt:g} s, {noise:g} HU, {name:8s}: mass "
                      + " ".join(f"{m:.2f}" for m in mass.mean(axis=0))
                      + " | MTT within shape " + " ".join(f"{m:.1f}" for m in
                                                         np.median(within, axis=0))
                      + f" | posterior mean {np.median(mean):.2f} s, best point "
                        f"{np.median(best):.2f} s")


if __name__ == "__main__":
    main()

"""SVD deconvolution: standard (sSVD), block-circulant (bSVD) and oscillation-index (oSVD).

- sSVD: Ostergaard et al., Magn. Reson. Med. 36:715 (1996), doi:10.1002/mrm.1910360510. Lower
  triangular AIF matrix, singular values below ``threshold`` x the largest discarded. Sensitive to
  the delay between AIF and tissue.
- bSVD and oSVD: Wu et al., Magn. Reson. Med. 50:164 (2003), doi:10.1002/mrm.10522. Both curves
  zero-padded to 2T and a circulant AIF matrix, which makes the result insensitive to delay; oSVD
  picks the truncation per voxel as the smallest threshold whose residue's oscillation index stays
  below ``oi``. A circulant matrix is diagonalised by the discrete Fourier transform, its singular
  values are the moduli of the AIF's spectrum, so the one decomposition shared by all voxels and
  all thresholds is the FFT of the padded AIF, and applying the truncated pseudo-inverse is an FFT
  product (identical to the explicit SVD, at O(T log T) per voxel).

All methods resample unevenly spaced frames to the uniform grid the maps use (the finest frame
interval, :func:`~ctperf.perfusion.curves.uniform_grid`). CBF = max of the flow-scaled residue,
CBV from the areas under the tissue and arterial curves (signed: negative where noise outweighs
the enhancement), MTT = CBV / CBF x 60 where both are positive (NaN elsewhere: no transit to
measure, not a negative one). Tmax = the time of the residue's maximum after the AIF (lag 0 = no
delay), refined between frames by the vertex of the parabola through the three samples around
it. The deconvolved residue is the tissue's effective residue: dispersion on the way from the
AIF's artery is part of it, so this is the package's Tmax convention (effective delay plus the
peak time of the dispersed residue). bSVD and oSVD read lags in the second half of the 2T
circular window as negative (tissue ahead of the AIF).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctperf.errors import ValidationError
from ctperf.io.integrity import fit_times
from ctperf.parallel import map_chunks
from ctperf.perfusion.curves import aif_area, finite_aif, resample, uniform_grid
from ctperf.types import SVD_METHODS

__all__ = ["SVDResult", "svd_deconvolve"]


@dataclass(frozen=True)
class SVDResult:
    """Per-voxel results, ndarrays of shape (N,), float64.

    ``cbf`` mL/100 g/min, ``cbv`` mL/100 g, ``mtt`` s, ``tmax`` s (time of the residue's peak after
    the AIF; negative when the tissue leads the AIF, for bSVD and oSVD), ``threshold`` the
    truncation used (fraction of the largest singular value).
    """

    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    tmax: np.ndarray
    threshold: np.ndarray


def _uniform(tissue: np.ndarray, aif: np.ndarray, times: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, float]:
    """The curves on the uniform grid the maps fit unevenly spaced frames on
    (:func:`~ctperf.perfusion.curves.uniform_grid`), and its step."""
    grid = uniform_grid(times)
    if grid is None:
        return tissue, aif, float(times[1] - times[0])
    return resample(tissue, times, grid), resample(aif, times, grid), float(grid[1] - grid[0])


def _peak_offset(res: np.ndarray, j: np.ndarray, *, circular: bool) -> np.ndarray:
    """Sub-sample position of each residue's peak, in samples from ``j`` (within +-0.5).

    The vertex of the parabola through the samples at ``j - 1``, ``j``, ``j + 1`` of ``res``
    (N, L). Circular residues wrap around; otherwise a peak at either end keeps offset 0.
    """
    n, length = res.shape
    rows = np.arange(n)
    if circular:
        left, right = res[rows, (j - 1) % length], res[rows, (j + 1) % length]
        edge = np.zeros(n, dtype=bool)
    else:
        left = res[rows, np.maximum(j - 1, 0)]
        right = res[rows, np.minimum(j + 1, length - 1)]
        edge = (j == 0) | (j == length - 1)
    mid = res[rows, j]
    curv = left - 2.0 * mid + right
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(~edge & (curv < 0), 0.5 * (left - right) / curv, 0.0)
    return np.clip(off, -0.5, 0.5)


def _oscillation(res: np.ndarray) -> np.ndarray:
    """Wu 2003 oscillation index of residues (..., L, N): mean |second difference| / max."""
    peak = np.max(res, axis=-2)
    second = np.abs(np.diff(res, n=2, axis=-2)).sum(axis=-2)
    return second / res.shape[-2] / np.where(peak > 0, peak, np.inf)


def svd_deconvolve(
    tissue: np.ndarray,
    aif: np.ndarray,
    times: np.ndarray,
    *,
    method: str = "bsvd",
    threshold: float | None = None,
    oi: float = 0.035,
    osvd_thresholds: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4),
    rho: float = 1.04,
    kh: float = 0.733,
    chunk: int = 8192,
    workers: int | None = None,
    progress: bool = False,
) -> SVDResult:
    """Deconvolve tissue curves by the arterial input.

    Parameters
    ----------
    tissue : ndarray, shape (T, N)
        Tissue enhancement in HU.
    aif : ndarray, shape (T,)
        Arterial enhancement in HU (partial-volume corrected).
    times : ndarray, shape (T,)
        Seconds, strictly increasing.
    method : {"ssvd", "bsvd", "osvd"}
    threshold : float, optional
        Truncation, fraction of the largest singular value; default 0.2 (sSVD) or 0.1 (bSVD).
        Unused by oSVD, which picks from ``osvd_thresholds`` per voxel.
    oi : float
        Oscillation-index limit of oSVD.
    rho, kh : float
        Brain density (g/mL) and haematocrit ratio.
    chunk : int
        Voxels per block (memory: oSVD holds 10 residues of 2T samples per voxel).
    workers : int, optional
        Threads over blocks; default one per CPU core.
    progress : bool
        A progress bar over voxels.

    Returns
    -------
    SVDResult
    """
    if method not in SVD_METHODS:
        raise ValidationError(f"method must be 'ssvd', 'bsvd' or 'osvd', got {method!r}")
    tis = np.asarray(tissue)
    if not np.issubdtype(tis.dtype, np.floating):
        tis = tis.astype(np.float64)
    if tis.ndim == 1:
        tis = tis[:, None]
    t = fit_times(times)
    ca = finite_aif(aif, t)
    if tis.shape[0] != t.size or ca.shape != t.shape:
        raise ValidationError(
            f"tissue (T, N), aif (T,) and times (T,) must agree: {tis.shape}, {ca.shape}, {t.shape}"
        )
    area_a = aif_area(ca, t)
    cbv = (kh / rho) * 100.0 * np.trapezoid(tis, t, axis=0) / area_a
    tis_u, ca_u, dt = _uniform(tis, ca, t)
    n_t, n = tis_u.shape
    to_cbf = 6000.0 * kh / rho
    cbf = np.empty(n)
    tmax = np.empty(n)
    used = np.empty(n)
    if method == "ssvd":
        thr = 0.2 if threshold is None else float(threshold)
        idx = np.subtract.outer(np.arange(n_t), np.arange(n_t))
        mat = np.where(idx >= 0, ca_u[np.clip(idx, 0, None)], 0.0) * dt
        u, s, vt = np.linalg.svd(mat)
        inv = np.where(s >= thr * s[0], 1.0 / np.where(s > 0, s, 1.0), 0.0)
        pinv = (vt.T * inv) @ u.T

        def block(a: int, b: int) -> None:
            res = pinv @ tis_u[:, a:b]
            j = np.argmax(res, axis=0)
            cols = np.arange(j.size)
            cbf[a:b] = to_cbf * res[j, cols]
            tmax[a:b] = (j + _peak_offset(res.T, j, circular=False)) * dt
            used[a:b] = thr
    else:
        length = 2 * n_t
        spec = np.fft.rfft(ca_u, n=length) * dt
        mod = np.abs(spec)
        thresholds = (np.asarray(osvd_thresholds, dtype=np.float64) if method == "osvd"
                      else np.array([0.1 if threshold is None else float(threshold)]))
        # Inverse filters, one per threshold: 1/spectrum where |spectrum| >= thr * max, else 0.
        keep = mod[None, :] >= thresholds[:, None] * mod.max()
        inv = np.where(keep, 1.0 / np.where(mod > 0, spec, 1.0)[None, :], 0.0)
        lag = np.arange(length)
        lag_time = np.where(lag < n_t, lag, lag - length) * dt

        def block(a: int, b: int) -> None:
            c_spec = np.fft.rfft(tis_u[:, a:b], n=length, axis=0)
            res = np.fft.irfft(inv[:, :, None] * c_spec[None], n=length, axis=1)  # (P, L, n)
            if method == "osvd":
                ok = _oscillation(res) <= oi
                pick = np.where(ok.any(axis=0), np.argmax(ok, axis=0), thresholds.size - 1)
            else:
                pick = np.zeros(res.shape[2], dtype=np.intp)
            cols = np.arange(res.shape[2])
            chosen = res[pick, :, cols]  # (n, L)
            j = np.argmax(chosen, axis=1)
            cbf[a:b] = to_cbf * chosen[cols, j]
            tmax[a:b] = lag_time[j] + _peak_offset(chosen, j, circular=True) * dt
            used[a:b] = thresholds[pick]
    # each chunk writes only its own voxels: the chunks run in threads (the FFTs and the matrix
    # products release the GIL)
    map_chunks(block, n, chunk=chunk, workers=workers, progress=progress, desc=method,
               unit="voxel")
    cbf = np.maximum(cbf, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mtt = np.where((cbf > 0) & (cbv > 0), 60.0 * cbv / cbf, np.nan)
    return SVDResult(cbf=cbf, cbv=cbv, mtt=mtt, tmax=tmax, threshold=used)

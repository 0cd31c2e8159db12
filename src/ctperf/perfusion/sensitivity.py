"""Whether a study's core can be seen: tissue of known perfusion, simulated with the study's own
arterial input, frame times, noise and healthy blood volume, read back by the method that made
its maps.

The core is tissue whose CBF reads under a fraction (30 %) of the healthy reference. Where the
contrast-to-noise is low, or the frames coarse and the bolus wide, deconvolution reads a low flow
high (the maximum of a noisy residue, or a truncation that flattens it) and healthy flow low,
and the core can vanish from the maps with no other sign. :func:`core_contrast` measures that
compression on the study's own terms; the ``core_unseen`` QC flag (:func:`core_unseen_flag`)
reports it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ctperf.errors import ValidationError
from ctperf.perfusion.bayes.grid import ResidueGrid
from ctperf.perfusion.curves import flow_scale
from ctperf.perfusion.lesions import MIN_NORMAL_SHARE
from ctperf.perfusion.voxelfit import fit_voxels

__all__ = ["CORE_PROBE", "HEALTHY_PROBE", "PROBE_CURVES", "PROBE_CUT", "core_contrast",
           "core_unseen_flag", "normal_cbv"]

#: The healthy tissue of the probe: CBV (mL/100 g; the study's own normal tissue's median
#: where known, :func:`normal_cbv`), MTT, delay and mean dispersion (s), exponential residue:
#: about grey and white matter together, which is what the contralateral reference measures.
HEALTHY_PROBE = {"cbv": 2.7, "mtt": 4.0, "delay": 0.5, "dispersion": 0.5}
#: The core of the probe: CBF two-thirds of the core's threshold (a fifth of the healthy
#: probe's at the default 30 %: well inside the rule), MTT 10 s (so CBV half the healthy
#: probe's at the default threshold, and the same passage at any threshold), late and dispersed
#: (delay and dispersion in the middle of an ischaemic core's 4-10 s and 1-3 s;
#: docs/methods.md, "Can the core be seen").
CORE_PROBE = {"threshold_share": 2.0 / 3.0, "mtt": 10.0, "delay": 6.0, "dispersion": 2.0}
#: Curves simulated of each tissue. The read (a ratio of their medians) varies between noise
#: draws by an SD of 2-3 % of itself (10 draws at 2 and 4 HU per 0.5 s frame: 0.005-0.017).
PROBE_CURVES = 400
#: The core probe's curve still at this fraction of its peak at the last frame: the scan ended
#: before its passage peaked, and no read of it means much (on 30 s scans whose bolus arrived
#: at 18 s the maps read a core's relative CBF anywhere from 0.09 to 8.8, the probe from 0.16
#: to 14).
PROBE_CUT = 0.95
#: Residue of both probes: exponential (gamma transit times of shape 1).
PROBE_RESIDUE = "gamma:1"


def normal_cbv(cbv: np.ndarray, tmax: np.ndarray, keep: np.ndarray, tmax_hypo: float
               ) -> float | None:
    """Median CBV (mL/100 g) of the voxels ``keep`` (vessels left out) whose Tmax is not above
    ``tmax_hypo``: the study's normal tissue, as its maps read it (scaled by the AIF those maps
    used, so the probe's curves stand as high as its tissue's). Where under
    :data:`~ctperf.perfusion.lesions.MIN_NORMAL_SHARE` of them is timely (the whole brain late),
    the median of them all, as the lesions' reference falls back to the brain's. Noise's
    negative values count (left out, they had raised the median of a noisy study's CBV
    several-fold). None without a finite value."""
    v, t = np.asarray(cbv, dtype=np.float64), np.asarray(tmax, dtype=np.float64)
    valid = np.asarray(keep, dtype=bool) & np.isfinite(v)
    normal = valid & (t <= tmax_hypo)
    if np.count_nonzero(normal) < MIN_NORMAL_SHARE * np.count_nonzero(valid):
        normal = valid
    return float(np.median(v[normal])) if normal.any() else None


def _probe_curves(aif: np.ndarray, times: np.ndarray, *, healthy_cbv: float, threshold: float,
                  rho: float, kh: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Noise-free enhancement (T,) of the healthy and the core probe for this AIF and these
    frames (the Bayesian grid's forward model: convolution on a 0.05 s grid), and the core's
    true relative CBF."""
    h_cbf = 60.0 * healthy_cbv / HEALTHY_PROBE["mtt"]
    share = CORE_PROBE["threshold_share"] * threshold
    curves = []
    for cbf, probe in ((h_cbf, HEALTHY_PROBE), (share * h_cbf, CORE_PROBE)):
        mtt = probe["mtt"]
        grid = ResidueGrid(aif, times, scale=flow_scale(rho, kh), mtt_range=(mtt, mtt), n_mtt=1,
                           delay_range=(probe["delay"], probe["delay"]), delay_step=1.0,
                           residues=(PROBE_RESIDUE,), dispersions=(probe["dispersion"],))
        curves.append(cbf * grid.responses[0].astype(np.float64))
    return curves[0], curves[1], share


def core_contrast(method: str, aif: np.ndarray, times: np.ndarray, *, noise_sd: float,
                  n_base: int, healthy_cbv: float | None = None, threshold: float = 0.3,
                  rho: float = 1.04, kh: float = 0.733, device: str | None = None,
                  seed: int = 0) -> float | None:
    """The relative CBF ``method`` reads for the core probe: the median CBF of
    :data:`PROBE_CURVES` noisy curves of :data:`CORE_PROBE` over that of as many of
    :data:`HEALTHY_PROBE` (truth: two-thirds of ``threshold``).

    Each curve is the probe's enhancement for this AIF at these frames plus Gaussian noise of
    ``noise_sd`` HU per frame, less the mean of its first ``n_base`` frames (the baseline the
    study's curves lost, noise and all). Deterministic for a ``seed``.

    Parameters
    ----------
    method : str
        A voxel-wise method of :data:`~ctperf.perfusion.METHODS` (not ``bayes``, which pools
        neighbours: independent curves would judge it by what it does not do).
    aif : ndarray, shape (T,)
        The AIF as the study's fits used it, HU.
    times : ndarray, shape (T,)
    noise_sd : float
        The tissue curves' noise, HU per frame
        (:func:`~ctperf.perfusion.inputs.pre_bolus_noise_sd`).
    n_base : int
        Baseline frames subtracted from the study's curves.
    healthy_cbv : float, optional
        The healthy probe's CBV, mL/100 g (:func:`normal_cbv`); default
        ``HEALTHY_PROBE["cbv"]``. Zero or less (normal tissue read with no blood): 1.0.
    threshold : float
        The core's relative-CBF threshold (``LesionOptions.core_rcbf``).
    rho, kh : float
    device : str, optional
        As for :func:`~ctperf.perfusion.fit_box_nlr`.

    Returns
    -------
    float or None
        1.0 at most (the core read as high as healthy tissue, or healthy tissue read with no
        flow: nothing of a core can be seen); None where the scan ends before the core probe's
        passage peaks (its last frame at :data:`PROBE_CUT` of its peak or above).
    """
    if method == "bayes":
        raise ValidationError("core_contrast judges voxel-wise methods; bayes pools neighbours")
    cbv = HEALTHY_PROBE["cbv"] if healthy_cbv is None else float(healthy_cbv)
    if not (math.isfinite(cbv) and 0 < threshold < 1):
        raise ValidationError(f"core_contrast needs a finite healthy CBV and a threshold in "
                              f"(0, 1), got {healthy_cbv} and {threshold}")
    t = np.asarray(times, dtype=np.float64)
    # (the probes' shapes do not depend on the CBV: the default's stand in where it is <= 0)
    healthy, core, _ = _probe_curves(np.asarray(aif, dtype=np.float64), t,
                                     healthy_cbv=cbv if cbv > 0 else HEALTHY_PROBE["cbv"],
                                     threshold=threshold, rho=rho, kh=kh)
    if not core.max() > 0 or core[-1] >= PROBE_CUT * core.max():
        return None  # the scan ends before the core's passage peaks: nothing to read it from
    if cbv <= 0:
        return 1.0  # normal tissue read with no blood: no core can be told from it
    rng = np.random.default_rng(seed)
    clean = np.repeat(np.stack([healthy, core], axis=1), PROBE_CURVES, axis=1)  # (T, 2n)
    noisy = clean + rng.normal(0.0, float(noise_sd), clean.shape)
    noisy -= noisy[:max(int(n_base), 1)].mean(axis=0)
    values, _, _ = fit_voxels(method, noisy.astype(np.float32), np.asarray(aif, np.float32), t,
                              rho=rho, kh=kh, brain=None, spacing=(1.0, 1.0, 1.0),
                              device=device, progress=False, n_base=n_base)
    cbf = np.nan_to_num(np.asarray(values["cbf"], dtype=np.float64), nan=0.0)
    normal = float(np.median(cbf[:PROBE_CURVES]))
    read = float(np.median(cbf[PROBE_CURVES:])) / normal if normal > 0 else math.inf
    return min(read, 1.0)


def core_unseen_flag(read: float | None, threshold: float | None) -> dict[str, Any]:
    """The ``core_unseen`` QC entry: ``read``, :func:`core_contrast`'s relative CBF (None: not
    judged), against the core's relative-CBF ``threshold`` (None: the core was not defined by
    relative CBF)."""
    value = None if read is None or threshold is None else round(float(read), 3)
    share = CORE_PROBE["threshold_share"]
    return {"flag": value is not None and threshold is not None and value >= threshold,
            "value": value,
            "reason": f"tissue at {share:.2g} of the core's relative-CBF threshold (a fifth of "
                      "healthy CBF at the default 30 %; an exponential residue, 6 s late and "
                      "dispersed), simulated with this study's AIF, frames, noise and normal "
                      "tissue's CBV, reads a relative CBF (the value) at or above that "
                      "threshold with this method: at this study's noise, frames and bolus it "
                      "reads low flow high and healthy flow low, so the maps miss much of a "
                      "core, with no other sign, and what they call core may be noise (1.0: "
                      "nothing of a core can be seen). Not judged (null) for bayes (it pools "
                      "neighbours), a core defined by CBV, or where the scan ends before the "
                      "probe's passage peaks (truncation is raised then, and a core may be lost "
                      "unjudged). Filter a noisy study (--filter), or read the core with bayes "
                      "or by CBV (--core-cbv)"}

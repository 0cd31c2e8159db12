"""Whether a study's core can be seen: tissue of known perfusion, simulated with the study's own
arterial input, frame times and noise, read back by the method that made its maps.

The core is tissue whose CBF reads under a fraction (30 %) of the healthy reference. At low
contrast-to-noise, deconvolution reads a low flow high (the maximum of a noisy residue, or a
truncation that flattens it) and healthy flow low, and the core can vanish from the maps with
no other sign. :func:`core_contrast` measures that compression on the study's own terms; the
``core_unseen`` QC flag (:func:`core_unseen_flag`) reports it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctperf.errors import ValidationError
from ctperf.perfusion.bayes.grid import ResidueGrid
from ctperf.perfusion.curves import flow_scale

__all__ = ["CORE_PROBE", "HEALTHY_PROBE", "PROBE_CURVES", "core_contrast", "core_unseen_flag"]

#: The healthy tissue of the probe: CBF (mL/100 g/min), CBV (mL/100 g), delay and mean
#: dispersion (s), exponential residue. About the median of grey and white matter together,
#: which is what the contralateral reference measures.
HEALTHY_PROBE = {"cbf": 40.0, "cbv": 2.7, "delay": 0.5, "dispersion": 0.5}
#: The core of the probe: CBF a fifth of the healthy probe's (well inside the 30 % rule), CBV
#: half of it, later and more dispersed (docs/methods.md, "Can the core be seen").
CORE_PROBE = {"cbf": 8.0, "cbv": 1.35, "delay": 3.0, "dispersion": 2.0}
#: Curves simulated of each tissue. The read (a ratio of their medians) varies between noise
#: draws by an SD of 2-3 % of itself (10 draws at 2 and 4 HU per 0.5 s frame: 0.005-0.017).
PROBE_CURVES = 400
#: Residue of both probes: exponential (gamma transit times of shape 1).
PROBE_RESIDUE = "gamma:1"


def _probe_curves(aif: np.ndarray, times: np.ndarray, *, rho: float, kh: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free enhancement (T,) of the healthy and the core probe for this AIF and these
    frames (the Bayesian grid's forward model: convolution on a 0.05 s grid)."""
    probes = (HEALTHY_PROBE, CORE_PROBE)
    mtts = [60.0 * p["cbv"] / p["cbf"] for p in probes]
    curves = []
    for probe, mtt in zip(probes, mtts, strict=True):
        grid = ResidueGrid(aif, times, scale=flow_scale(rho, kh), mtt_range=(mtt, mtt), n_mtt=1,
                           delay_range=(probe["delay"], probe["delay"]), delay_step=1.0,
                           residues=(PROBE_RESIDUE,), dispersions=(probe["dispersion"],))
        curves.append(probe["cbf"] * grid.responses[0].astype(np.float64))
    return curves[0], curves[1]


def core_contrast(method: str, aif: np.ndarray, times: np.ndarray, *, noise_sd: float,
                  n_base: int, rho: float = 1.04, kh: float = 0.733, device: str | None = None,
                  seed: int = 0) -> float | None:
    """The relative CBF ``method`` reads for the core probe: the median CBF of
    :data:`PROBE_CURVES` noisy curves of :data:`CORE_PROBE` over that of as many of
    :data:`HEALTHY_PROBE` (truth: 0.2).

    Each curve is the probe's enhancement for this AIF at these frames plus Gaussian noise of
    ``noise_sd`` HU per frame, less the mean of its first ``n_base`` frames (the baseline the
    study's curves lost, noise and all). Deterministic for a ``seed``.

    Parameters
    ----------
    method : str
        A voxel-wise method of :data:`~ctperf.perfusion.METHODS` (not ``bayes``, which pools
        neighbours: independent curves would judge it by what it does not do).
    aif : ndarray, shape (T,)
        The AIF as the study's fits used it (partial-volume corrected), HU.
    times : ndarray, shape (T,)
    noise_sd : float
        The tissue curves' noise, HU per frame
        (:func:`~ctperf.perfusion.inputs.pre_bolus_noise_sd`).
    n_base : int
        Baseline frames subtracted from the study's curves.
    rho, kh : float
    device : str, optional
        As for :func:`~ctperf.perfusion.fit_box_nlr`.

    Returns
    -------
    float or None
        None when the healthy probe's median CBF is not positive (nothing to divide by).
    """
    from ctperf.perfusion.voxelfit import fit_voxels  # voxelfit imports the methods

    if method == "bayes":
        raise ValidationError("core_contrast judges voxel-wise methods; bayes pools neighbours")
    t = np.asarray(times, dtype=np.float64)
    healthy, core = _probe_curves(np.asarray(aif, dtype=np.float64), t, rho=rho, kh=kh)
    rng = np.random.default_rng(seed)
    clean = np.repeat(np.stack([healthy, core], axis=1), PROBE_CURVES, axis=1)  # (T, 2n)
    noisy = clean + rng.normal(0.0, float(noise_sd), clean.shape)
    noisy -= noisy[:max(int(n_base), 1)].mean(axis=0)
    values, _, _ = fit_voxels(method, noisy.astype(np.float32), np.asarray(aif, np.float32), t,
                              rho=rho, kh=kh, brain=None, spacing=(1.0, 1.0, 1.0),
                              device=device, progress=False, n_base=n_base)
    cbf = np.nan_to_num(np.asarray(values["cbf"], dtype=np.float64), nan=0.0)
    normal = float(np.median(cbf[:PROBE_CURVES]))
    if not normal > 0:
        return None
    return float(np.median(cbf[PROBE_CURVES:])) / normal


def core_unseen_flag(read: float | None, threshold: float | None) -> dict[str, Any]:
    """The ``core_unseen`` QC entry: ``read``, :func:`core_contrast`'s relative CBF (None: not
    judged), against the core's relative-CBF ``threshold`` (None: the core was not defined by
    relative CBF)."""
    share = CORE_PROBE["cbf"] / HEALTHY_PROBE["cbf"]
    value = None if read is None or threshold is None else round(float(read), 3)
    return {"flag": value is not None and threshold is not None and value >= threshold,
            "value": value,
            "reason": f"tissue at {share:.0%} of healthy CBF, simulated with this study's AIF, "
                      "frames and noise (an exponential residue, delayed and dispersed), reads a "
                      "relative CBF (the value) at or above the core's threshold with this "
                      "method: at this contrast-to-noise it reads low flow high (and healthy "
                      "flow low), so the maps miss half or more of such a core, with no other "
                      "sign, and what they call core may be noise. Not judged for bayes (it "
                      "pools neighbours) or a core defined by CBV. Filter the study (--filter), "
                      "or read the core with bayes or by CBV (--core-cbv)"}

"""Digital CT perfusion phantom with known ground truth.

A subject is an axial brain slab (default 8 x 5 mm slices, 512 x 512 over 230 mm, 89 frames 0.5 s
apart, 80 kV, 150 mAs) with grey and white matter, CSF, skull, scalp, the major arteries and the
venous sinuses, a random pose and warp, vascular territories and, in 70-80 % of subjects, an MCA
occlusion with an infarct core and a penumbra. See :func:`generate_subject`,
:func:`write_subject` and :func:`read_subject` (cohorts:
:func:`ctperf.workflow.generate_cohort`); the simulated distributions are measured in the phantom
documentation.

Truth conventions
-----------------
- Tissue enhancement (HU above baseline) is
  ``C(t) = (rho / kH) (CBF / 6000) [Ca(. - delay) * h_disp * R](t)`` with ``rho = 1.04`` g/mL and
  ``kH = (1 - 0.45) / (1 - 0.25) = 0.733`` (both written to ``params`` and the truth provenance);
  ``R(0) = 1``, ``MTT = integral R``, ``CBV = CBF MTT / 60``. ``R`` is a box, exponential or
  gamma residue, one shape per subject. CBF and CBV are per 100 g of the voxel's content,
  so voxels partly filled with CSF have proportionally lower values.
- ``delay`` is the pure arrival shift of the tissue's arterial input relative to the AIF
  (healthy tissue may be reached up to 1 s before the AIF's artery: small negative delays);
  dispersion (an exponential kernel ``h_disp``) is reported separately as its mean,
  ``extras["dispersion"]``.
- ``tmax = delay + argmax_t (h_disp * R)(t)``, both evaluated on the fine simulation grid, taking
  the first time the maximum is reached (within a relative 1e-3, so that a plateau has a first
  time): an undispersed box gives ``tmax = delay``
  (:func:`ctperf.phantom.hemodynamics.residue_peak_time`).
- ``ttp`` is the time from the first frame to the peak of the noise-free tissue curve (sampled at
  the frames, refined by a parabola through the three highest samples).
- Core = brain tissue whose CBF is below 0.3 x the healthy CBF the voxel would have without the
  lesion (``extras["cbf_healthy"]``); hypoperfused = ``tmax > 6`` s; penumbra = hypoperfused
  minus core. Truth maps are 0 outside the brain mask (tissue fraction >= 0.5, away from
  vessels).
- ``aif`` is the true arterial enhancement without partial volume: a gamma variate convolved
  with the rectangular injection (volume / rate), plus recirculation; arterial voxels carry
  0.4-0.9 of it (``extras["artery_pv"]``). The sinuses are large enough that ``vein`` voxels are
  free of partial volume, and the VOF (AIF convolved with a unit-area transit kernel) has the
  AIF's area over all time; a study ends before the VOF's tail does, so within it the VOF's
  area falls short of the AIF's (by about 4 %, docs/phantom.md "Known limits").
- Curves are simulated on a fine grid (0.05 s at 0.5 s frames) and sampled at the frames; voxel
  delays are rounded to that grid and dispersion to 0.1 s, and the truth maps hold the rounded
  values that were simulated.
- Every random quantity is drawn first (:func:`draw_parameters`, the subject's ``params.json``);
  :func:`simulate_subject` makes the subject from them deterministically.

Anatomy: a procedural head by default, the same wherever ctperf runs; with ``anatomy="mni"``
(or ``"auto"`` when nilearn is installed) the grey and white matter come from the MNI152 2009
templates bundled with nilearn (loaded offline; see docs for their licence notice).
"""

from ctperf.phantom.cohort import read_subject, subject_seed, write_subject
from ctperf.phantom.generate import (
    MASK_NAMES,
    PhantomSubject,
    draw_parameters,
    generate_subject,
    simulate_subject,
)

__all__ = [
    "MASK_NAMES",
    "PhantomSubject",
    "draw_parameters",
    "generate_subject",
    "read_subject",
    "simulate_subject",
    "subject_seed",
    "write_subject",
]

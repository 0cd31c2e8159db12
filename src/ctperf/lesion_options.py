"""Thresholds and clean-up of the lesion segmentation, as typed fields.

:class:`LesionOptions` is what :func:`ctperf.perfusion.segment_lesions`,
:func:`ctperf.perfusion.run_perfusion`, the evaluation of maps cohorts and the CLI share. It lives
apart from :mod:`ctperf.perfusion` (which re-exports it) so that the CLI can take its option
defaults from these fields without importing SciPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ctperf.errors import ValidationError

__all__ = ["MAX_SMOOTH_MM", "REFERENCES", "THRESHOLDS_ONLY", "TMAX_RANGE_S", "LesionOptions"]


#: The Tmax thresholds a lesion may be defined by, s (``--tmax`` and :class:`LesionOptions`).
TMAX_RANGE_S = (1.0, 30.0)
#: The largest radius of the lesions' median (mm): ten times the default, a quarter of a
#: hemisphere's width (a radius of 10^6 mm had asked for terabytes).
MAX_SMOOTH_MM = 20.0
#: The normal-tissue references of the core's relative CBF (``--core-reference``).
REFERENCES = ("contralateral", "global")


@dataclass(frozen=True)
class LesionOptions:
    """Thresholds and clean-up of the lesion segmentation
    (:func:`~ctperf.perfusion.segment_lesions`).

    The defaults are those of ``ctperf maps``; :data:`THRESHOLDS_ONLY` applies the same
    thresholds to the maps as they are (the default of
    :func:`~ctperf.perfusion.segment_lesions` and :func:`~ctperf.perfusion.run_perfusion`).
    Change a field with :func:`dataclasses.replace`.

    Attributes
    ----------
    core_rcbf : float
        Core where CBF < ``core_rcbf`` x the normal-tissue reference (when ``core_cbv`` is
        None); a fraction.
    core_cbv : float or None
        Core where CBV < ``core_cbv`` mL/100 g instead.
    tmax_hypo : float
        Hypoperfused where Tmax > ``tmax_hypo`` s.
    tmax_severe : float
        Severely hypoperfused (the ``tmax10`` mask) where Tmax > ``tmax_severe`` s.
    smooth_mm : float
        Radius (mm) of an in-plane median filter applied to CBF, CBV and Tmax inside the brain
        before thresholding (noisy maps give speckled masks); 0 thresholds the maps as they are.
    min_component_ml : float
        Connected pieces of each mask smaller than this (mL) are dropped; 0 keeps all.
    core_within_hypoperfused : bool
        Keep only core voxels that are also hypoperfused (see :mod:`ctperf.perfusion.lesions`);
        False labels low flow wherever it lies.
    reference : {"contralateral", "global"}
        The normal CBF the core's relative CBF divides by: normally perfused tissue mirrored
        across the mid-sagittal plane, around each voxel, or the median of all normally
        perfused brain (where the other side is not healthy either).
    """

    core_rcbf: float = 0.30
    core_cbv: float | None = None
    tmax_hypo: float = 6.0
    tmax_severe: float = 10.0
    smooth_mm: float = 2.0
    min_component_ml: float = 0.1
    core_within_hypoperfused: bool = True
    reference: str = "contralateral"

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValidationError(f"lesion option reference must be one of "
                                  f"{', '.join(REFERENCES)}, got {self.reference!r}")
        for name, value in (("core_rcbf", self.core_rcbf), ("tmax_hypo", self.tmax_hypo),
                            ("tmax_severe", self.tmax_severe), ("smooth_mm", self.smooth_mm),
                            ("min_component_ml", self.min_component_ml)):
            if not value >= 0:
                raise ValidationError(f"lesion option {name} must be 0 or more, got {value}")
        if self.core_cbv is not None and not self.core_cbv > 0:
            raise ValidationError(f"lesion option core_cbv must be positive, got {self.core_cbv}")
        # the command line's ranges: a percentage typed for the fraction (30 for 0.3) had made
        # every hypoperfused voxel core
        if not self.core_rcbf < 1:
            raise ValidationError(f"lesion option core_rcbf is a fraction of normal CBF, under "
                                  f"1 (0.3 for 30 %), got {self.core_rcbf}")
        if self.smooth_mm > MAX_SMOOTH_MM:
            raise ValidationError(f"lesion option smooth_mm is the median's radius in plane, "
                                  f"{MAX_SMOOTH_MM:g} mm at most, got {self.smooth_mm}")
        lo, hi = TMAX_RANGE_S
        for name, value in (("tmax_hypo", self.tmax_hypo), ("tmax_severe", self.tmax_severe)):
            if not lo <= value <= hi:
                raise ValidationError(f"lesion option {name} must be {lo:g} to {hi:g} s, got "
                                      f"{value}")

    @classmethod
    def from_thresholds(cls, thresholds: Any) -> LesionOptions | None:
        """The options a lesion summary's ``thresholds`` (``summary.json``'s
        ``lesions.thresholds``, :attr:`~ctperf.perfusion.LesionResult.thresholds`) were made
        with, or None when they do not say all of them (an older or another tool's summary).

        The core's reference is the one asked for (``reference_asked``; a summary from before
        2026-12-07 names only the one used, and where that fell back to the brain's median the
        default is taken); a reference given as numbers (``"given"``) cannot be taken again:
        None."""
        try:
            core, hypo, severe = (thresholds[k] for k in ("core", "hypoperfused", "tmax10"))
            rcbf = {} if "cbv_below_ml_per_100g" in core else {
                "core_rcbf": core["rcbf_below"],
                # "given" (numbers) is no option: refused below, so None
                "reference": core.get("reference_asked", core["reference"]
                                      if core["reference"] in (*REFERENCES, "given")
                                      else cls.reference)}
            options = cls(core_cbv=core.get("cbv_below_ml_per_100g"), **rcbf,
                          tmax_hypo=hypo["tmax_above_s"], tmax_severe=severe["tmax_above_s"],
                          smooth_mm=thresholds["smooth_mm"],
                          min_component_ml=thresholds["min_component_ml"],
                          core_within_hypoperfused=thresholds["core_within_hypoperfused"])
        except (KeyError, TypeError, ValidationError):
            return None
        numbers = (options.core_rcbf, options.tmax_hypo, options.tmax_severe, options.smooth_mm,
                   options.min_component_ml, *([] if rcbf else [options.core_cbv]))
        if not (isinstance(options.core_within_hypoperfused, bool) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in numbers)):
            return None
        return options


#: The thresholds of :class:`LesionOptions` on the maps as they are: no median filter, no
#: piece dropped.
THRESHOLDS_ONLY = LesionOptions(smooth_mm=0.0, min_component_ml=0.0)

"""Fixed physical windows that map perfusion maps to [0, 1] and back, and input HU scaling.

The network's sigmoid output lives in [0, 1]; every target map is scaled there with a fixed window
in physical units (not per-image min/max, so a prediction has a unit). Values outside a window are
clipped. The windows are stored in every checkpoint, so a model always maps back with the windows
it was trained with.

==========  ==========================  ==================  =========================
target      reference map it learns     window              reason
==========  ==========================  ==================  =========================
``cbv``     ``cbv`` (mL/100 g)          0 - 10              GM ~4, vessels clip
``cbf``     ``cbf`` (mL/100 g/min)      0 - 100             GM ~60 (SD 8), WM ~25
``ttp``     ``ttp`` (s)                 0 - 40              counted from frame 1
``delay``   ``delay`` (s)               0 - 15              core delays up to 10 s
``mtt``     ``mtt`` (s)                 0 - 20              ischaemic MTT up to ~20 s
``tmax``    ``tmax`` (s)                0 - 20              hypoperfusion > 6 / > 10 s
==========  ==========================  ==================  =========================

``ttp`` is the time to peak of the tissue curve (UniToBrain folder ``NLR_TTP``, the map the
paper's network was trained on); ``delay`` is the box model's arrival delay after the AIF
(UniToBrain folder ``NLR_Delay``), a different map. Each target is written under its own map
name (``ttp.nii.gz``, ``delay.nii.gz``).

Inputs: HU are clipped to a window (default -100 to 400 HU, wide enough for enhanced arteries and
veins, cutting bone) and then standardised with the training set's mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ctperf.errors import ValidationError

__all__ = [
    "DEFAULT_HU_WINDOW",
    "TARGET_MAPS",
    "TARGET_WINDOWS",
    "from_unit",
    "normalise_input",
    "target_map",
    "target_maps",
    "to_unit",
]

#: Target name -> name of the reference map it is trained on and predicted as.
TARGET_MAPS: dict[str, str] = {"cbv": "cbv", "cbf": "cbf", "ttp": "ttp", "delay": "delay",
                               "mtt": "mtt", "tmax": "tmax"}

#: Target name -> (low, high) window in the reference map's physical unit.
TARGET_WINDOWS: dict[str, tuple[float, float]] = {
    "cbv": (0.0, 10.0),
    "cbf": (0.0, 100.0),
    "ttp": (0.0, 40.0),
    "delay": (0.0, 15.0),
    "mtt": (0.0, 20.0),
    "tmax": (0.0, 20.0),
}

#: Input HU window (low, high) applied before standardisation.
DEFAULT_HU_WINDOW: tuple[float, float] = (-100.0, 400.0)


def target_map(target: str) -> str:
    """Reference map name for a target, with a clear error if unknown."""
    try:
        return TARGET_MAPS[target]
    except KeyError:
        raise ValidationError(
            f"unknown target {target!r}; choose from {sorted(TARGET_MAPS)}") from None


def target_maps(targets: Iterable[str]) -> tuple[str, ...]:
    """The reference maps the ``targets`` learn (:func:`target_map`), once each, in order."""
    return tuple(dict.fromkeys(target_map(t) for t in targets))


def _window(target: str, windows: Mapping[str, Sequence[float]] | None) -> tuple[float, float]:
    table = TARGET_WINDOWS if windows is None else windows
    if target not in table:
        raise ValidationError(f"no window for target {target!r}; have {sorted(table)}")
    lo, hi = (float(v) for v in table[target])
    if not hi > lo:
        raise ValidationError(f"window for {target!r} must have high > low, got ({lo}, {hi})")
    return lo, hi


def to_unit(values: np.ndarray, target: str, *,
            windows: Mapping[str, Sequence[float]] | None = None) -> np.ndarray:
    """Physical units -> [0, 1] with the target's window (clipped; NaN stays NaN).

    Parameters
    ----------
    values : ndarray, any shape
        Map values in the reference map's unit (e.g. mL/100 g for ``cbv``, s for ``ttp``).
    target : str
        Target name (a key of :data:`TARGET_WINDOWS`).
    windows : mapping, optional
        Target -> (low, high); defaults to :data:`TARGET_WINDOWS`.
    """
    lo, hi = _window(target, windows)
    return np.clip((np.asarray(values, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


def from_unit(values: np.ndarray, target: str, *,
              windows: Mapping[str, Sequence[float]] | None = None) -> np.ndarray:
    """[0, 1] -> physical units with the target's window (inverse of :func:`to_unit`)."""
    lo, hi = _window(target, windows)
    return (lo + (hi - lo) * np.asarray(values, dtype=np.float32)).astype(np.float32)


def normalise_input(hu: np.ndarray, *, window: Sequence[float], mean: float,
                    std: float) -> np.ndarray:
    """Clip HU to ``window`` and standardise: ``(clip(hu) - mean) / std``.

    Parameters
    ----------
    hu : ndarray, any shape
        Attenuation in HU.
    window : (float, float)
        HU clip window.
    mean, std : float
        Mean and standard deviation of the clipped training inputs, HU.

    Returns
    -------
    ndarray, float32, same shape
    """
    if not std > 0:
        raise ValidationError(f"input standard deviation must be > 0 HU, got {std}")
    clipped = np.clip(np.asarray(hu, dtype=np.float32), float(window[0]), float(window[1]))
    return (clipped - np.float32(mean)) / np.float32(std)

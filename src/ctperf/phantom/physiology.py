"""Vascular territories, healthy perfusion fields and the MCA-occlusion lesion of a phantom subject.

Territories (labels 1-6: ACA, MCA, PCA on the right, then the same on the left) are the nearest of
six seed points in template mm, with an anisotropic metric and a smooth jitter. An occlusion of the
MCA (M1: the whole territory; M2: its superior or inferior division) creates a severity field
``s`` in [0, 1] that rises smoothly from the territory border inwards (collaterals at the border).
With ``s``: ``CBF = (1 - 0.95 s) x healthy``; ``CBV`` follows a piecewise-linear factor (up to
1.2 x at moderate ``s``, 0.3 x at ``s = 1``), ``delay`` rises by ``sqrt(s) x`` a per-subject
maximum (4-9 s) and dispersion by ``s x`` 1-2.5 s. Healthy fields vary smoothly and by texture,
never constant inside a tissue, and their smooth part is left/right symmetric (a healthy brain
perfuses both hemispheres alike); healthy delays may be slightly negative (tissue reached before
the artery the AIF is measured in). The residue shape is one per subject. Benign oligaemia (in
some lesion-free subjects) is a mild severity field in one MCA territory: slightly later arrival,
CBF down by at most 10 %. Measured distributions are in the phantom documentation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctperf.phantom.geometry import cosine_field, draw_field, symmetric_field

__all__ = ["DELAY_FLOOR", "TERRITORIES", "draw_physiology", "territory_fields", "tissue_parameters"]

#: Territory labels: 0 outside, then ACA/MCA/PCA right (1-3) and left (4-6).
TERRITORIES: dict[int, str] = {1: "ACA_R", 2: "MCA_R", 3: "PCA_R",
                               4: "ACA_L", 5: "MCA_L", 6: "PCA_L"}
# seed (template mm, right side) and metric scale per axis
_SEEDS = {"ACA": ((6.0, 22.0, 40.0), (2.6, 0.8, 0.9)),
          "MCA": ((44.0, -5.0, 14.0), (1.0, 1.0, 1.0)),
          "PCA": ((14.0, -78.0, 4.0), (1.3, 0.75, 1.0))}
_M2 = {"M2sup": (46.0, 8.0, 34.0), "M2inf": (46.0, -30.0, 0.0)}
#: Earliest healthy arrival relative to the AIF's artery (s).
DELAY_FLOOR = -1.0
# CBV factor against severity: up to 1.2 x in the penumbra, 0.3 x at full severity
_CBV_S = (0.0, 0.45, 0.74, 1.0)
_CBV_F = (1.0, 1.2, 0.65, 0.3)


def draw_physiology(rng: np.random.Generator, *, lesion: bool, residues: tuple[str, ...]
                    ) -> dict[str, Any]:
    """Draw every haemodynamic parameter of a subject (JSON-able).

    Parameters
    ----------
    rng : numpy.random.Generator
        The subject's physiology stream.
    lesion : bool
        Draw an MCA occlusion (else, sometimes, a benign oligaemia).
    residues : tuple of str
        Residue shapes to draw the subject's one shape from.
    """
    p: dict[str, Any] = {
        "cbf_gm": float(np.clip(rng.normal(60, 8), 42, 80)),
        "cbf_wm": float(np.clip(rng.normal(25, 4), 17, 34)),
        # MTT rather than CBV is drawn, so that healthy MTT stays plausible (GM ~4 s, WM ~5.3 s)
        # and CBV follows (GM ~4.0, WM ~2.2 mL/100 g)
        "mtt_gm": float(np.clip(rng.normal(4.0, 0.35), 3.2, 5.0)),
        "mtt_wm": float(np.clip(rng.normal(5.3, 0.45), 4.3, 6.5)),
        # with the smooth field (about +-0.5 s) and WM's later arrival: GM about -0.9 to 1.1 s,
        # WM -0.4 to 1.6 s (clipped at DELAY_FLOOR)
        "delay_base": float(rng.uniform(-0.4, 0.6)),
        "tau_base": float(rng.uniform(0.05, 0.3)),
        "field_cbf": draw_field(rng, wavelength_mm=45.0),
        "field_cbv": draw_field(rng, wavelength_mm=45.0),
        "field_delay": draw_field(rng, wavelength_mm=70.0),
        "field_tau": draw_field(rng, wavelength_mm=70.0),
        "field_jitter": [draw_field(rng, n=6, wavelength_mm=50.0) for _ in range(3)],
        "field_severity": draw_field(rng, wavelength_mm=30.0),
    }
    p["cbv_gm"] = p["cbf_gm"] * p["mtt_gm"] / 60.0
    p["cbv_wm"] = p["cbf_wm"] * p["mtt_wm"] / 60.0
    p["residue"] = str(rng.choice(residues))
    p["gamma_shape"] = float(rng.uniform(2.5, 5.0))
    if lesion:
        kind = str(rng.choice(["M1", "M2sup", "M2inf"], p=[0.5, 0.25, 0.25]))
        p["lesion"] = {
            "occlusion": kind,
            "side": str(rng.choice(["R", "L"])),
            "peak_severity": float(rng.uniform(0.5, 0.95)),
            "width_mm": float(rng.uniform(30, 60)),
            "delay_max": float(rng.uniform(4.0, 9.0)),
            "tau_max": float(rng.uniform(1.0, 2.5)),
            "oligaemia": False,
        }
    elif rng.uniform() < 0.3:  # benign oligaemia: mild delay, no tissue at risk
        p["lesion"] = {
            "occlusion": "none", "side": str(rng.choice(["R", "L"])),
            "peak_severity": float(rng.uniform(0.1, 0.25)), "width_mm": 15.0,
            "delay_max": float(rng.uniform(1.5, 3.0)), "tau_max": 0.5, "oligaemia": True,
        }
    else:
        p["lesion"] = None
    return p


def territory_fields(q: np.ndarray, phys: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Territory labels and lesion severity at template points q (..., 3).

    Returns
    -------
    labels : ndarray, int16, shape (...)
        1-6 (see :data:`TERRITORIES`).
    severity : ndarray, float32, shape (...)
        0 (unaffected) to 1.
    """
    jit = np.stack([cosine_field(q, f) for f in phys["field_jitter"]], axis=-1) * 6.0
    qj = q + jit
    right = qj[..., 0] >= 0
    qm = qj.copy()
    qm[..., 0] = np.abs(qm[..., 0])
    dists = []
    for name in ("ACA", "MCA", "PCA"):
        seed, scale = _SEEDS[name]
        dists.append(np.linalg.norm((qm - np.array(seed)) * np.array(scale), axis=-1))
    d = np.stack(dists)
    order = np.argmin(d, axis=0)
    labels = (order + 1 + np.where(right, 0, 3)).astype(np.int16)
    severity = np.zeros(q.shape[:-1], dtype=np.float32)
    les = phys.get("lesion")
    if les is None:
        return labels, severity
    side_ok = right if les["side"] == "R" else ~right
    margin = np.minimum(d[0], d[2]) - d[1]  # > 0 inside the MCA territory (mm)
    if les["occlusion"] in _M2:
        other = "M2inf" if les["occlusion"] == "M2sup" else "M2sup"
        here = np.linalg.norm(qm - np.array(_M2[les["occlusion"]]), axis=-1)
        there = np.linalg.norm(qm - np.array(_M2[other]), axis=-1)
        margin = np.minimum(margin, there - here)
    x = np.clip(margin / les["width_mm"], 0.0, 1.0)
    profile = x * x * (3 - 2 * x)  # smoothstep: 0 at the border, 1 a width inside
    wobble = 1.0 + 0.15 * cosine_field(q, phys["field_severity"])
    severity = np.clip(les["peak_severity"] * profile * wobble, 0.0, 1.0) * side_ok
    return labels, severity.astype(np.float32)


def tissue_parameters(q: np.ndarray, gm: np.ndarray, wm: np.ndarray, severity: np.ndarray,
                      texture: np.ndarray, phys: dict[str, Any]) -> dict[str, np.ndarray]:
    """Voxel perfusion parameters from tissue fractions (per 100 g of the voxel's content).

    Parameters
    ----------
    q : ndarray, shape (..., 3)
        Template mm of the voxel centres.
    gm, wm : ndarray, shape (...)
        Grey and white matter fractions.
    severity : ndarray, shape (...)
        Lesion severity from :func:`territory_fields`.
    texture : ndarray, shape (2, ...)
        Two fine-scale unit-variance random textures.

    Returns
    -------
    dict with cbf, cbf_healthy (mL/100 g/min), cbv (mL/100 g), mtt, delay, tau (s), all float64.
    """
    tissue = gm + wm
    safe = np.maximum(tissue, 1e-6)
    f_cbf = (1 + 0.10 * symmetric_field(q, phys["field_cbf"])) * (1 + 0.05 * texture[0])
    # CBV follows CBF with its own smaller variation, so healthy MTT varies by ~6 % only
    f_cbv = (f_cbf * (1 + 0.05 * symmetric_field(q, phys["field_cbv"]))
             * (1 + 0.03 * texture[1]))
    cbf_h = (gm * phys["cbf_gm"] + wm * phys["cbf_wm"]) * f_cbf
    cbv_h = (gm * phys["cbv_gm"] + wm * phys["cbv_wm"]) * f_cbv
    wm_share = wm / safe
    delay = np.maximum(phys["delay_base"] + 0.5 * wm_share
                       + 0.35 * symmetric_field(q, phys["field_delay"]), DELAY_FLOOR)
    # healthy dispersion: a mean of 0-0.5 s
    tau = np.clip(phys["tau_base"] + 0.1 * (1 + symmetric_field(q, phys["field_tau"])), 0.0, 0.5)
    les = phys.get("lesion")
    s = severity.astype(np.float64)
    if les is not None and les["oligaemia"]:  # mild: blood flow and volume barely change
        cbf = cbf_h * (1 - 0.4 * s)
        cbv = cbv_h * (1 - 0.2 * s)
        delay = delay + les["delay_max"] * s
        tau = tau + les["tau_max"] * s
    elif les is not None:
        cbf = cbf_h * (1 - 0.95 * s)
        cbv = cbv_h * np.interp(s, _CBV_S, _CBV_F)
        # arrival is late well beyond the tissue that loses flow: delay rises as sqrt(s)
        delay = delay + les["delay_max"] * np.sqrt(s)
        tau = tau + les["tau_max"] * s
    else:
        cbf, cbv = cbf_h, cbv_h
    mtt = np.where(cbf > 1e-6, 60.0 * cbv / np.maximum(cbf, 1e-6), 0.0)
    return {"cbf": cbf, "cbf_healthy": cbf_h, "cbv": cbv, "mtt": mtt, "delay": delay,
            "tau": tau}

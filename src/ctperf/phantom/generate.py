"""Generate one digital CTP subject with known truth (see :mod:`ctperf.phantom` for conventions)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ctperf.errors import ValidationError
from ctperf.phantom import acquisition as acq
from ctperf.phantom import hemodynamics as hd
from ctperf.phantom.anatomy import CHANNELS, TEMPLATE_NOTICE, load_template, sample_template
from ctperf.phantom.geometry import (
    cosine_field,
    draw_field,
    draw_pose,
    patient_to_template,
    scanner_affine,
    voxel_centres,
)
from ctperf.phantom.physiology import draw_physiology, territory_fields, tissue_parameters
from ctperf.types import CTPSeries, PerfusionMaps

__all__ = ["MASK_NAMES", "PhantomSubject", "generate_subject"]

log = logging.getLogger(__name__)

MASK_NAMES: tuple[str, ...] = ("brain", "gm", "wm", "csf", "vessels", "artery", "vein", "core",
                               "penumbra", "territories")
_SUBSLICES = (-1 / 3, 0.0, 1 / 3)  # box slice profile, three samples across the slice
_FINE_DT = 0.05  # s, upper bound of the fine simulation step


@dataclass(frozen=True, eq=False)
class PhantomSubject:
    """A simulated CTP study and its truth.

    Attributes
    ----------
    series : CTPSeries
        The study in HU (noise, blur and motion included), (T, Z, Y, X).
    truth : PerfusionMaps
        cbf, cbv, mtt, ttp, tmax, delay on the study grid; 0 outside the brain mask.
    masks : dict of str to ndarray
        bool (Z, Y, X) for brain, gm, wm, csf, vessels, artery, vein, core, penumbra; int16
        ``territories`` (labels of :data:`ctperf.phantom.physiology.TERRITORIES`, 0 outside brain).
    aif, vof : ndarray, float64, shape (T,)
        Noise-free arterial (without partial volume) and venous enhancement (HU) at the frames.
    motion : ndarray, shape (T, 6)
        Per-frame rotations about x, y, z (deg) and shifts (mm), frame 0 the reference.
    params : dict
        Every sampled parameter, the seed and the configuration (JSON-able).
    baseline : ndarray, float32, shape (Z, Y, X)
        Noise-free unenhanced image (HU), blurred like the study, without motion.
    extras : dict of str to ndarray
        float32 (Z, Y, X): ``cbf_healthy``, ``dispersion`` (kernel mean, s), ``severity``,
        ``artery_pv`` (fraction of the arterial enhancement each voxel carries),
        ``vessel_fraction`` (arterial plus venous blood fraction, after blur), ``gm_fraction``
        and ``wm_fraction`` (tissue fractions, without blur).
    fine_times, aif_fine, vof_fine : ndarray, shape (n,)
        The curves on the fine simulation grid.
    """

    series: CTPSeries
    truth: PerfusionMaps
    masks: dict[str, np.ndarray]
    aif: np.ndarray
    vof: np.ndarray
    motion: np.ndarray
    params: dict[str, Any]
    baseline: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    fine_times: np.ndarray = field(default_factory=lambda: np.zeros(0))
    aif_fine: np.ndarray = field(default_factory=lambda: np.zeros(0))
    vof_fine: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _check(size: int, slices: int, frames: int, interval: float, mas: float, motion: str,
           residues: tuple[str, ...]) -> None:
    if size < 32 or slices < 1 or frames < 2:
        raise ValidationError(f"need size >= 32, slices >= 1, frames >= 2; got size={size}, "
                              f"slices={slices}, frames={frames}")
    if not interval > 0 or not mas > 0:
        raise ValidationError(f"interval and mas must be > 0, got {interval}, {mas}")
    if motion not in ("none", "mild", "severe", "realistic"):
        raise ValidationError(f"motion must be none, mild, severe or realistic, got {motion!r}")
    bad = [r for r in residues if r not in hd.RESIDUES]
    if not residues or bad:
        raise ValidationError(f"residues must be a non-empty subset of {hd.RESIDUES}, got "
                              f"{residues!r}")


def _draw_aif(rng: np.random.Generator, peak: float | None) -> dict[str, float]:
    alpha = float(rng.uniform(2.0, 5.0))
    beta = float(min(rng.uniform(1.0, 2.5), 8.0 / alpha))  # time to peak at most 8 s
    return {"peak": float(rng.uniform(250, 600)) if peak is None else float(peak),
            "t0": float(rng.uniform(3.0, 12.0)), "alpha": alpha, "beta": beta,
            "recirculation": float(rng.uniform(0.0, 0.3)),
            "recirc_delay": float(rng.uniform(8.0, 12.0)),
            "vof_transit_mean": float(rng.uniform(6.0, 9.0))}


def _ttp(curves: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Time from the first frame to the peak, refined by a parabola through the top 3 samples."""
    k = np.argmax(curves, axis=1)
    kk = np.clip(k, 1, curves.shape[1] - 2)
    rows = np.arange(curves.shape[0])
    y0, y1, y2 = curves[rows, kk - 1], curves[rows, kk], curves[rows, kk + 1]
    den = y0 - 2 * y1 + y2
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(den < 0, 0.5 * (y0 - y2) / den, 0.0)
    off = np.where((k == kk), np.clip(off, -0.5, 0.5), 0.0)
    t = np.interp(kk + off, np.arange(times.size), times)
    return np.where(k == kk, t, times[k]) - times[0]


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """In-plane Gaussian blur of a (Y, X) image (identity below 0.05 pixel)."""
    return ndi.gaussian_filter(image, sigma_px, truncate=3.5) if sigma_px > 0.05 else image


def _tissue_enhancement(bank: hd.CurveBank, kinds: tuple[str, ...], phys: dict[str, Any], *,
                        labels: np.ndarray, tissue: np.ndarray, cbf: np.ndarray,
                        mtt: np.ndarray, delay_steps: np.ndarray, tau_index: np.ndarray,
                        times: np.ndarray, rho: float, kh: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free tissue enhancement (Y*X, T) float32 and TTP (Y*X,) of one slice."""
    n = tissue.size
    enh = np.zeros((n, times.size), dtype=np.float32)  # voxel-major: rows fill fast
    ttp = np.zeros(n)
    vox = np.flatnonzero(tissue.ravel() > 0.01)
    if phys["residue_mode"] == "subject":
        kind_of = np.zeros(vox.size, dtype=np.int64)
    else:
        lut = np.array([kinds.index(phys["residue_by_territory"][str(k)]) for k in range(1, 7)])
        kind_of = lut[np.clip(labels.ravel()[vox] - 1, 0, 5)]
    for ki, kind in enumerate(kinds):
        v = vox[kind_of == ki]
        if v.size == 0:
            continue
        curves = bank.enhancement(kind, cbf=cbf.ravel()[v], mtt=mtt.ravel()[v],
                                  delay_steps=delay_steps.ravel()[v],
                                  tau_index=tau_index.ravel()[v], rho=rho, kh=kh)
        enh[v] = curves
        ttp[v] = _ttp(curves, times)
    return enh, ttp


def _slice_masks(frac: np.ndarray, art_b: np.ndarray, vein_b: np.ndarray, *,
                 labels: np.ndarray, cbf: np.ndarray, cbf_healthy: np.ndarray,
                 tmax: np.ndarray) -> dict[str, np.ndarray]:
    """The masks of one slice from fractions (C, Y, X), blurred vessel fractions and truth."""
    gm, wm, csf = frac[0], frac[1], frac[CHANNELS.index("csf")]
    vessels = (art_b + vein_b) > 0.01
    brain = (gm + wm >= 0.5) & ~vessels
    core = brain & (cbf < 0.3 * cbf_healthy)
    return {"brain": brain, "gm": brain & (gm >= 0.5), "wm": brain & (wm >= 0.5),
            "csf": (csf >= 0.5) & ~vessels, "vessels": vessels, "artery": art_b >= 0.4,
            "vein": vein_b >= 0.95, "core": core, "penumbra": brain & (tmax > 6.0) & ~core,
            "territories": np.where(brain, labels, 0).astype(np.int16)}


def generate_subject(*, seed: int, size: int = 512, slices: int = 8, frames: int = 89,
                     interval: float = 0.5, mas: float = 150.0, motion: str = "none",
                     lesion: bool | None = None,
                     residues: tuple[str, ...] = ("box", "exponential", "gamma"),
                     anatomy: str = "auto", lesion_free_fraction: float = 0.25,
                     aif_peak: float | None = None, noise: bool = True,
                     psf_fwhm_mm: float = 1.2, fov_mm: float = 230.0, thickness_mm: float = 5.0,
                     rho: float = hd.RHO, kh: float = hd.KH, progress: bool = False
                     ) -> PhantomSubject:
    """Simulate one CTP study with its true perfusion maps, generated slice by slice.

    Parameters
    ----------
    seed : int
        Everything is deterministic from ``seed`` and the configuration.
    size, slices, frames : int
        In-plane pixels (FOV ``fov_mm``), slices of ``thickness_mm``, time frames.
    interval : float
        Seconds between frames (times are ``k * interval``).
    mas : float
        Tube current-time product: noise sigma = 103 / sqrt(mas) HU.
    motion : str
        ``"none"``, ``"mild"``, ``"severe"`` or ``"realistic"`` (58/24/19 % draw).
    lesion : bool or None
        Force an MCA occlusion (True), none (False) or draw one with probability
        ``1 - lesion_free_fraction`` (None).
    residues : tuple of str
        Residue shapes to draw from, per subject or per territory.
    anatomy : str
        ``"auto"``, ``"procedural"`` or ``"mni"``.
    aif_peak : float, optional
        Fix the AIF's first-pass peak (HU) instead of drawing it in 250-600.
    noise : bool
        Add noise (False gives the noise-free study).
    psf_fwhm_mm : float
        In-plane blur of the scanner (0 for none).
    rho, kh : float
        Tissue density (g/mL) and haematocrit factor of the indicator-dilution model.
    progress : bool
        Show a tqdm bar over slices.

    Returns
    -------
    PhantomSubject
    """
    residues = tuple(residues)
    _check(size, slices, frames, interval, mas, motion, residues)
    if not 0.0 <= lesion_free_fraction <= 1.0:
        raise ValidationError(f"lesion_free_fraction must be in [0, 1], got {lesion_free_fraction}")
    config = {"seed": int(seed), "size": size, "slices": slices, "frames": frames,
              "interval": interval, "mas": mas, "motion": motion, "lesion": lesion,
              "residues": list(residues), "anatomy": anatomy,
              "lesion_free_fraction": lesion_free_fraction, "aif_peak": aif_peak,
              "noise": noise, "psf_fwhm_mm": psf_fwhm_mm, "fov_mm": fov_mm,
              "thickness_mm": thickness_mm}
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(6)]
    r_pose, r_phys, r_aif, r_motion, r_noise, r_tex = streams
    template = load_template(anatomy)
    pose = draw_pose(r_pose)
    base_hu = acq.draw_baseline(r_pose)
    pv_field = draw_field(r_pose, wavelength_mm=25.0)
    has_lesion = bool(r_phys.uniform() >= lesion_free_fraction) if lesion is None else lesion
    phys = draw_physiology(r_phys, lesion=has_lesion, residues=residues)
    aif_p = _draw_aif(r_aif, aif_peak)
    times = np.arange(frames) * float(interval)
    step = int(np.ceil(interval / _FINE_DT - 1e-9))
    dt = interval / step
    fine_t = np.arange((frames - 1) * step + 1) * dt
    aif_fine = hd.aif_curve(fine_t, **{k: aif_p[k] for k in (
        "peak", "t0", "alpha", "beta", "recirculation", "recirc_delay")})
    vof_fine = hd.vof_curve(aif_fine, dt, transit_mean=aif_p["vof_transit_mean"])
    aif, vof = aif_fine[::step], vof_fine[::step]
    if phys["residue_mode"] == "subject":
        kinds = (phys["residue"],)
    else:
        kinds = tuple(sorted(set(phys["residue_by_territory"].values())))
    bank = hd.CurveBank.build(aif_fine, dt=dt, step=step, n_frames=frames, kinds=kinds,
                              gamma_shape=phys["gamma_shape"])
    affine = scanner_affine(size=size, slices=slices, fov_mm=fov_mm, thickness_mm=thickness_mm)
    pixel = fov_mm / size
    sig_psf = acq.psf_sigma_px(psf_fwhm_mm, pixel)
    shape3 = (slices, size, size)
    hu = np.empty((frames, *shape3), dtype=np.float32)
    maps = {n: np.zeros(shape3, dtype=np.float32) for n in ("cbf", "cbv", "mtt", "ttp", "tmax",
                                                            "delay")}
    extras = {n: np.zeros(shape3, dtype=np.float32) for n in ("cbf_healthy", "dispersion",
                                                              "severity", "artery_pv",
                                                              "vessel_fraction", "gm_fraction",
                                                              "wm_fraction")}
    masks = {n: np.zeros(shape3, dtype=bool) for n in MASK_NAMES if n != "territories"}
    masks["territories"] = np.zeros(shape3, dtype=np.int16)
    baseline = np.zeros(shape3, dtype=np.float32)
    z_iter: Any = range(slices)
    if progress:
        from tqdm import tqdm

        z_iter = tqdm(z_iter, desc="slices", unit="slice", leave=False)
    for z in z_iter:
        sub = np.stack([patient_to_template(voxel_centres(affine, size=size, z=z + u), pose)
                        for u in _SUBSLICES])
        frac = sample_template(template, sub).mean(axis=1)  # (C, Y, X)
        q = sub[len(_SUBSLICES) // 2]
        pv = 0.725 + 0.175 * np.clip(cosine_field(q, pv_field), -1, 1)
        art = frac[CHANNELS.index("artery")]
        frac[CHANNELS.index("csf")] += art * (1 - pv)
        frac[CHANNELS.index("artery")] = art * pv
        labels, severity = territory_fields(q, phys)
        tex = acq.smooth_noise(r_tex, (3, size, size), sigma_px=1.2 / pixel)
        gm, wm = frac[0], frac[1]
        par = tissue_parameters(q, gm, wm, severity, tex[:2], phys)
        mtt = np.clip(par["mtt"], hd.MTT_MIN, hd.MTT_MAX)
        cbv = par["cbf"] * mtt / 60.0
        d_steps = bank.quantize_delay(par["delay"])
        t_idx = bank.quantize_tau(par["tau"])
        delay = d_steps * dt
        tau = bank.taus[t_idx]
        tissue = gm + wm
        enh, ttp = _tissue_enhancement(bank, kinds, phys, labels=labels, tissue=tissue,
                                       cbf=par["cbf"], mtt=mtt, delay_steps=d_steps,
                                       tau_index=t_idx, times=times, rho=rho, kh=kh)
        a_frac = frac[CHANNELS.index("artery")].ravel()
        v_frac = frac[CHANNELS.index("vein")].ravel()
        ves = np.flatnonzero((a_frac > 0) | (v_frac > 0))
        enh[ves] += (a_frac[ves, None] * aif[None] + v_frac[ves, None] * vof[None]).astype(
            np.float32)
        base = acq.baseline_hu(frac, base_hu, tex[2])
        hu[:, z] = enh.T.reshape(frames, size, size)
        hu[:, z] += base[None]
        del enh
        baseline[z] = _blur(base, sig_psf)
        art_b = _blur(frac[CHANNELS.index("artery")], sig_psf)
        vein_b = _blur(frac[CHANNELS.index("vein")], sig_psf)
        tmax = delay + mtt / 2
        slice_masks = _slice_masks(frac, art_b, vein_b, labels=labels, cbf=par["cbf"],
                                   cbf_healthy=par["cbf_healthy"], tmax=tmax)
        for name, mask in slice_masks.items():
            masks[name][z] = mask
        brain = slice_masks["brain"]
        for name, val in (("cbf", par["cbf"]), ("cbv", cbv), ("mtt", mtt),
                          ("ttp", ttp.reshape(size, size)), ("tmax", tmax), ("delay", delay)):
            maps[name][z] = np.where(brain, val, 0.0)
        for name, val in (("cbf_healthy", par["cbf_healthy"]), ("dispersion", tau),
                          ("severity", severity), ("artery_pv", art_b),
                          ("vessel_fraction", art_b + vein_b), ("gm_fraction", gm),
                          ("wm_fraction", wm)):
            extras[name][z] = val
    category, motion_params = acq.draw_motion(r_motion, motion, times)
    for t in range(1, frames):
        if np.any(np.abs(motion_params[t]) > 1e-6):
            hu[t] = acq.apply_motion(hu[t], affine, motion_params[t])
    sigma = acq.noise_sigma(mas) if noise else 0.0
    for z in range(slices):
        block = hu[:, z]
        if sigma > 0:
            block += r_noise.standard_normal(block.shape, dtype=np.float32) * np.float32(
                sigma / acq.filtered_std(sig_psf) if sig_psf > 0.05 else sigma)
        if sig_psf > 0.05:
            hu[:, z] = ndi.gaussian_filter(block, (0, sig_psf, sig_psf), truncate=3.5)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    volumes = {n: float(masks[n].sum() * voxel_ml) for n in ("core", "penumbra")}
    volumes["hypoperfused"] = volumes["core"] + volumes["penumbra"]
    params = {"config": config, "pose": pose, "baseline_hu": base_hu, "artery_pv_field": pv_field,
              "physiology": phys, "aif": aif_p, "motion_category": category,
              "noise_sigma_hu": sigma, "noise_k": acq.NOISE_K, "psf_sigma_px": sig_psf,
              "fine_dt": dt, "template": template.source,
              "template_notice": TEMPLATE_NOTICE if template.source == "mni" else None,
              "rho": rho, "kh": kh,
              "volumes_ml": volumes, "lesion": phys["lesion"] is not None
              and phys["lesion"]["occlusion"] != "none"}
    uid = int.from_bytes(hashlib.sha256(repr(sorted(config.items())).encode()).digest()[:12],
                         "big")
    meta = {"series_uid": f"2.25.{uid}",
            "description": f"ctperf phantom seed {seed}", "scanner": "ctperf digital phantom",
            "kvp": 80, "mas": mas, "timing_source": "phantom"}
    series = CTPSeries(hu=hu, times=times, affine=affine, meta=meta)
    truth = PerfusionMaps(maps=maps, affine=affine, provenance={
        "method": "ctperf phantom truth", "constants": {"rho": rho, "kH": kh},
        "tmax_convention": "delay + MTT/2", "seed": int(seed)})
    return PhantomSubject(series=series, truth=truth, masks=masks, aif=aif, vof=vof,
                          motion=motion_params, params=params, baseline=baseline, extras=extras,
                          fine_times=fine_t, aif_fine=aif_fine, vof_fine=vof_fine)


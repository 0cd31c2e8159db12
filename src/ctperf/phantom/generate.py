"""Generate one digital CTP subject with known truth (see :mod:`ctperf.phantom` for conventions).

Two steps: :func:`draw_parameters` draws every random quantity of a subject from its seed (a
JSON-able dictionary, written as ``params.json``), and :func:`simulate_subject` turns such a
dictionary into the study and its truth without drawing anything else, slice by slice.
:func:`generate_subject` does both.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ctperf.errors import ValidationError
from ctperf.perfusion.curves import time_to_peak
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

__all__ = ["MASK_NAMES", "PhantomSubject", "draw_parameters", "generate_subject",
           "simulate_subject"]

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


def _frame_interval(cfg: dict[str, Any]) -> float:
    """Seconds between frames of a configuration (``interval`` in parameters written before
    the option was named ``frame_interval``)."""
    return float(cfg["frame_interval"] if "frame_interval" in cfg else cfg["interval"])


def _check(size: int, slices: int, frames: int, frame_interval: float, mas: float, motion: str,
           residues: tuple[str, ...]) -> None:
    if size < 32 or slices < 1 or frames < 2:
        raise ValidationError(f"need size >= 32, slices >= 1, frames >= 2; got size={size}, "
                              f"slices={slices}, frames={frames}")
    if not frame_interval > 0 or not mas > 0:
        raise ValidationError(f"frame_interval and mas must be > 0, got {frame_interval}, {mas}")
    if motion not in ("none", "mild", "severe", "realistic"):
        raise ValidationError(f"motion must be none, mild, severe or realistic, got {motion!r}")
    bad = [r for r in residues if r not in hd.RESIDUES]
    if not residues or bad:
        raise ValidationError(f"residues must be a non-empty subset of {hd.RESIDUES}, got "
                              f"{residues!r}")


def _noise_sigma(cfg: dict[str, Any]) -> float:
    """Per-pixel noise SD (HU) of the subject's own grid.

    ``K / sqrt(mAs)`` holds on the grid of ``noise_matrix`` pixels across the field of view
    (the subject's own size when None); a coarser subject gets that image's noise averaged
    into its pixels.
    """
    if not cfg["noise"]:
        return 0.0
    sigma = acq.noise_sigma(cfg["mas"])
    matrix = cfg.get("noise_matrix")
    if matrix is None:
        return sigma
    return acq.averaged_noise_sigma(sigma, native_pixel_mm=cfg["fov_mm"] / matrix,
                                    pixel_mm=cfg["fov_mm"] / cfg["size"],
                                    psf_fwhm_mm=cfg["psf_fwhm_mm"])


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """In-plane Gaussian blur of a (Y, X) image (identity below 0.05 pixel)."""
    return ndi.gaussian_filter(image, sigma_px, truncate=3.5) if sigma_px > 0.05 else image


def draw_parameters(*, seed: int, size: int = 512, slices: int = 8, frames: int = 89,
                    frame_interval: float = 0.5, mas: float = 150.0, motion: str = "none",
                    lesion: bool | None = None,
                    residues: tuple[str, ...] = ("box", "exponential", "gamma"),
                    anatomy: str = "procedural", lesion_free_fraction: float = 0.25,
                    aif_peak: float | None = None, noise: bool = True,
                    psf_fwhm_mm: float = 1.2, fov_mm: float = 230.0, thickness_mm: float = 5.0,
                    noise_matrix: int | None = None,
                    rho: float = hd.RHO, kh: float = hd.KH) -> dict[str, Any]:
    """Draw every random parameter of a subject (see :func:`generate_subject` for the options).

    Returns
    -------
    dict
        JSON-able: ``config`` (the options and the seed), ``pose``, ``baseline_hu``,
        ``artery_pv_field``, ``physiology``, ``aif``, ``motion_category``, ``motion`` (T x 6)
        and the seeds of the tissue texture and of the noise. :func:`simulate_subject` makes
        the subject from it.
    """
    residues = tuple(residues)
    _check(size, slices, frames, frame_interval, mas, motion, residues)
    if noise_matrix is not None and not 32 <= noise_matrix <= 4096:
        raise ValidationError(f"noise_matrix must be in 32-4096 pixels, got {noise_matrix}")
    if not 0.0 <= lesion_free_fraction <= 1.0:
        raise ValidationError(f"lesion_free_fraction must be in [0, 1], got {lesion_free_fraction}")
    config = {"seed": int(seed), "size": size, "slices": slices, "frames": frames,
              "frame_interval": frame_interval, "mas": mas, "motion": motion, "lesion": lesion,
              "residues": list(residues), "anatomy": anatomy,
              "lesion_free_fraction": lesion_free_fraction, "aif_peak": aif_peak,
              "noise": noise, "psf_fwhm_mm": psf_fwhm_mm, "fov_mm": fov_mm,
              "thickness_mm": thickness_mm, "noise_matrix": noise_matrix, "rho": rho, "kh": kh}
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(6)]
    r_pose, r_phys, r_aif, r_motion, r_noise, r_tex = streams
    pose = draw_pose(r_pose)
    base_hu = acq.draw_baseline(r_pose)
    pv_field = draw_field(r_pose, wavelength_mm=25.0)
    has_lesion = bool(r_phys.uniform() >= lesion_free_fraction) if lesion is None else lesion
    category, motion_params = acq.draw_motion(r_motion, motion, np.arange(frames) * frame_interval)
    return {"config": config, "pose": pose, "baseline_hu": base_hu,
            "artery_pv_field": pv_field,
            "physiology": draw_physiology(r_phys, lesion=has_lesion, residues=residues),
            "aif": hd.draw_aif(r_aif, aif_peak), "motion_category": category,
            "motion": motion_params.tolist(),
            "texture_seed": int(r_tex.integers(2**63)), "noise_seed": int(r_noise.integers(2**63))}


@dataclass(frozen=True, eq=False)
class _Setup:
    """What every slice of one subject shares."""

    template: Any
    affine: np.ndarray
    pixel_mm: float
    psf_px: float
    times: np.ndarray
    bank: hd.CurveBank
    kind: str
    aif: np.ndarray
    vof: np.ndarray
    params: dict[str, Any]


def _curves(params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, hd.CurveBank]:
    """Fine times, AIF and VOF on them, and the subject's curve bank."""
    cfg, phys = params["config"], params["physiology"]
    frames, interval = cfg["frames"], _frame_interval(cfg)
    step = int(np.ceil(interval / _FINE_DT - 1e-9))
    dt = interval / step
    n_fine = (frames - 1) * step + 1
    # the bank also needs the AIF after the last frame, for tissue reached before the artery
    n_long = n_fine + int(np.ceil(-hd.DELAY_MIN / dt)) + step
    aif_long = hd.aif_from_params(np.arange(n_long) * dt, params["aif"])
    aif_fine = aif_long[:n_fine]
    vof_fine = hd.vof_curve(aif_fine, dt, transit_mean=params["aif"]["vof_transit_mean"])
    bank = hd.CurveBank.build(aif_long, dt=dt, step=step, n_frames=frames,
                              kinds=(phys["residue"],), gamma_shape=phys["gamma_shape"])
    return np.arange(n_fine) * dt, aif_fine, vof_fine, bank


def _tissue(setup: _Setup, q: np.ndarray, frac: np.ndarray, tex: np.ndarray
            ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Perfusion parameters of one slice (as simulated), its noise-free tissue enhancement
    (Y*X, T) float32 and the severity field (Y, X)."""
    phys, bank = setup.params["physiology"], setup.bank
    cfg = setup.params["config"]
    labels, severity = territory_fields(q, phys)
    gm, wm = frac[0], frac[1]
    par = tissue_parameters(q, gm, wm, severity, tex[:2], phys)
    mtt = np.clip(par["mtt"], hd.MTT_MIN, hd.MTT_MAX)
    d_steps = bank.quantize_delay(par["delay"])
    t_idx = bank.quantize_tau(par["tau"])
    enh = np.zeros((gm.size, setup.times.size), dtype=np.float32)  # voxel-major: rows fill fast
    ttp = np.zeros(gm.size)
    vox = np.flatnonzero((gm + wm).ravel() > 0.01)
    if vox.size:
        curves = bank.enhancement(setup.kind, cbf=par["cbf"].ravel()[vox],
                                  mtt=mtt.ravel()[vox], delay_steps=d_steps.ravel()[vox],
                                  tau_index=t_idx.ravel()[vox], rho=cfg["rho"], kh=cfg["kh"])
        enh[vox] = curves
        ttp[vox] = time_to_peak(curves.T, setup.times)
    out = {"cbf": par["cbf"], "cbf_healthy": par["cbf_healthy"], "cbv": par["cbf"] * mtt / 60.0,
           "mtt": mtt, "delay": d_steps * bank.dt, "dispersion": bank.taus[t_idx],
           "ttp": ttp.reshape(gm.shape), "territories": labels}
    return out, enh, severity


def _simulate_slice(setup: _Setup, z: int, tex_rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Noise-free, motion-free frames (T, Y, X) of slice ``z``, its baseline (Y, X) and its
    maps, masks and extras (each (Y, X); penumbra and Tmax are added later)."""
    params, size = setup.params, setup.params["config"]["size"]
    sub = np.stack([patient_to_template(voxel_centres(setup.affine, size=size, z=z + u),
                                        params["pose"]) for u in _SUBSLICES])
    frac = sample_template(setup.template, sub).mean(axis=1)  # (C, Y, X)
    q = sub[len(_SUBSLICES) // 2]
    pv = 0.725 + 0.175 * np.clip(cosine_field(q, params["artery_pv_field"]), -1, 1)
    art = frac[CHANNELS.index("artery")]
    frac[CHANNELS.index("csf")] += art * (1 - pv)
    frac[CHANNELS.index("artery")] = art * pv
    tex = acq.smooth_noise(tex_rng, (3, size, size), sigma_px=1.2 / setup.pixel_mm)
    out, enh, severity = _tissue(setup, q, frac, tex)
    a_frac = frac[CHANNELS.index("artery")].ravel()
    v_frac = frac[CHANNELS.index("vein")].ravel()
    ves = np.flatnonzero((a_frac > 0) | (v_frac > 0))
    enh[ves] += (a_frac[ves, None] * setup.aif[None]
                 + v_frac[ves, None] * setup.vof[None]).astype(np.float32)
    base = acq.baseline_hu(frac, params["baseline_hu"], tex[2])
    frames = enh.T.reshape(setup.times.size, size, size) + base[None]
    art_b = _blur(frac[CHANNELS.index("artery")], setup.psf_px)
    vein_b = _blur(frac[CHANNELS.index("vein")], setup.psf_px)
    gm, wm, csf = frac[0], frac[1], frac[CHANNELS.index("csf")]
    vessels = (art_b + vein_b) > 0.01
    near_bone = _blur(frac[CHANNELS.index("bone")], setup.psf_px) > 0.01  # > ~15 HU of bone
    brain = (gm + wm >= 0.5) & ~vessels
    out.update({"brain": brain, "gm": brain & (gm >= 0.5), "wm": brain & (wm >= 0.5),
                "csf": (csf >= 0.5) & ~vessels & ~near_bone, "vessels": vessels,
                "artery": art_b >= 0.4,
                "vein": vein_b >= 0.95, "core": brain & (out["cbf"] < 0.3 * out["cbf_healthy"]),
                "severity": severity, "artery_pv": art_b, "vessel_fraction": art_b + vein_b,
                "gm_fraction": gm, "wm_fraction": wm})
    return frames, _blur(base, setup.psf_px), out


def _true_tmax(slabs: dict[str, np.ndarray], setup: _Setup) -> np.ndarray:
    """Truth Tmax (Z, Y, X): delay plus the first peak time of the simulated dispersed residue;
    0 outside the brain."""
    brain = slabs["brain"]
    tmax = np.zeros(brain.shape, dtype=np.float64)
    phys = setup.params["physiology"]
    tmax[brain] = slabs["delay"][brain] + hd.residue_peak_time(
        setup.kind, mtt=slabs["mtt"][brain], tau=slabs["dispersion"][brain], dt=setup.bank.dt,
        gamma_shape=phys["gamma_shape"])
    return tmax


def simulate_subject(params: dict[str, Any], *, progress: bool = False) -> PhantomSubject:
    """Make the subject described by ``params`` (from :func:`draw_parameters`), drawing nothing.

    Parameters
    ----------
    params : dict
        As returned by :func:`draw_parameters` (or read back from a subject's ``params.json``).
    progress : bool
        Show a tqdm bar over slices.

    Returns
    -------
    PhantomSubject
        Its ``params`` are ``params`` plus derived figures (noise sigma, fine step, template,
        lesion volumes).
    """
    cfg = params["config"]
    size, slices, frames = cfg["size"], cfg["slices"], cfg["frames"]
    template = load_template(cfg["anatomy"])
    affine = scanner_affine(size=size, slices=slices, fov_mm=cfg["fov_mm"],
                            thickness_mm=cfg["thickness_mm"])
    fine_t, aif_fine, vof_fine, bank = _curves(params)
    pixel = cfg["fov_mm"] / size
    setup = _Setup(template=template, affine=affine, pixel_mm=pixel,
                   psf_px=acq.psf_sigma_px(cfg["psf_fwhm_mm"], pixel),
                   times=np.arange(frames) * _frame_interval(cfg), bank=bank,
                   kind=params["physiology"]["residue"], aif=aif_fine[::bank.step],
                   vof=vof_fine[::bank.step], params=params)
    hu = np.empty((frames, slices, size, size), dtype=np.float32)
    baseline = np.zeros((slices, size, size), dtype=np.float32)
    per_slice: list[dict[str, np.ndarray]] = []
    tex_rng = np.random.default_rng(params["texture_seed"])
    z_iter: Any = range(slices)
    if progress:
        from tqdm import tqdm

        z_iter = tqdm(z_iter, desc="slices", unit="slice", leave=False)
    for z in z_iter:
        hu[:, z], baseline[z], out = _simulate_slice(setup, z, tex_rng)
        per_slice.append(out)
    slabs = {name: np.stack([o[name] for o in per_slice]) for name in per_slice[0]}
    slabs["tmax"] = _true_tmax(slabs, setup)
    if not slabs["artery"].any():
        # arteries thinner than a voxel nowhere reach 0.4 of one (small images): the mask
        # keeps the voxels nearest the largest share, as a reader would place an AIF
        slabs["artery"] = slabs["artery_pv"] >= 0.8 * slabs["artery_pv"].max()
    slabs["penumbra"] = slabs["brain"] & (slabs["tmax"] > 6.0) & ~slabs["core"]
    acq.acquire(hu, affine=affine, motion=np.asarray(params["motion"]).reshape(-1, 6),
                noise_sigma=_noise_sigma(cfg),
                psf_px=setup.psf_px, rng=np.random.default_rng(params["noise_seed"]))
    return _assemble(setup, hu, baseline, slabs, fine_t, aif_fine, vof_fine)


def _assemble(setup: _Setup, hu: np.ndarray, baseline: np.ndarray,
              slabs: dict[str, np.ndarray], fine_t: np.ndarray, aif_fine: np.ndarray,
              vof_fine: np.ndarray) -> PhantomSubject:
    params, cfg = setup.params, setup.params["config"]
    brain = slabs["brain"]
    maps = {n: np.where(brain, slabs[n], 0.0).astype(np.float32)
            for n in ("cbf", "cbv", "mtt", "ttp", "tmax", "delay")}
    masks = {n: slabs[n].astype(bool) for n in MASK_NAMES if n != "territories"}
    masks["territories"] = np.where(brain, slabs["territories"], 0).astype(np.int16)
    extras = {n: slabs[n].astype(np.float32) for n in (
        "cbf_healthy", "dispersion", "severity", "artery_pv", "vessel_fraction", "gm_fraction",
        "wm_fraction")}
    voxel_ml = abs(np.linalg.det(setup.affine[:3, :3])) / 1000.0
    volumes = {n: float(masks[n].sum() * voxel_ml) for n in ("core", "penumbra")}
    volumes["hypoperfused"] = volumes["core"] + volumes["penumbra"]
    phys, template = params["physiology"], setup.template
    derived = {"noise_sigma_hu": _noise_sigma(cfg),
               "noise_k": acq.NOISE_K, "psf_sigma_px": setup.psf_px, "fine_dt": setup.bank.dt,
               "template": template.source,
               "template_notice": TEMPLATE_NOTICE if template.source == "mni" else None,
               "rho": cfg["rho"], "kh": cfg["kh"], "volumes_ml": volumes,
               "lesion": phys["lesion"] is not None and phys["lesion"]["occlusion"] != "none"}
    full = {**params, **derived}
    uid = int.from_bytes(hashlib.sha256(repr(sorted(cfg.items())).encode()).digest()[:12],
                         "big")
    meta = {"series_uid": f"2.25.{uid}", "description": f"ctperf phantom seed {cfg['seed']}",
            "scanner": "ctperf digital phantom", "kvp": 80, "mas": cfg["mas"],
            "timing_source": "phantom"}
    series = CTPSeries(hu=hu, times=setup.times, affine=setup.affine, meta=meta)
    truth = PerfusionMaps(maps=maps, affine=setup.affine, provenance={
        "method": "ctperf phantom truth", "constants": {"rho": cfg["rho"], "kH": cfg["kh"]},
        "tmax_convention": "delay + first time of the maximum of the dispersed residue "
                           f"(relative tolerance {hd.TMAX_FLAT_TOL:g}, fine grid)",
        "residue": phys["residue"], "seed": int(cfg["seed"])})
    return PhantomSubject(series=series, truth=truth, masks=masks, aif=setup.aif, vof=setup.vof,
                          motion=np.asarray(params["motion"], dtype=np.float64).reshape(-1, 6),
                          params=full, baseline=baseline, extras=extras, fine_times=fine_t,
                          aif_fine=aif_fine, vof_fine=vof_fine)


def generate_subject(*, seed: int, size: int = 512, slices: int = 8, frames: int = 89,
                     frame_interval: float = 0.5, mas: float = 150.0, motion: str = "none",
                     lesion: bool | None = None,
                     residues: tuple[str, ...] = ("box", "exponential", "gamma"),
                     anatomy: str = "procedural", lesion_free_fraction: float = 0.25,
                     aif_peak: float | None = None, noise: bool = True,
                     psf_fwhm_mm: float = 1.2, fov_mm: float = 230.0, thickness_mm: float = 5.0,
                     noise_matrix: int | None = None,
                     rho: float = hd.RHO, kh: float = hd.KH, progress: bool = False
                     ) -> PhantomSubject:
    """Simulate one CTP study with its true perfusion maps.

    :func:`draw_parameters` then :func:`simulate_subject`.

    Parameters
    ----------
    seed : int
        Everything is deterministic from ``seed`` and the configuration.
    size, slices, frames : int
        In-plane pixels (FOV ``fov_mm``), slices of ``thickness_mm``, time frames.
    frame_interval : float
        Seconds between frames (times are ``k * frame_interval``).
    mas : float
        Tube current-time product: noise sigma = 103 / sqrt(mas) HU.
    motion : str
        ``"none"``, ``"mild"``, ``"severe"`` or ``"realistic"`` (58/24/19 % draw).
    lesion : bool or None
        Force an MCA occlusion (True), none (False) or draw one with probability
        ``1 - lesion_free_fraction`` (None).
    residues : tuple of str
        Residue shapes to draw the subject's one shape from.
    anatomy : str
        ``"procedural"`` (the default, the same head wherever ctperf runs), ``"mni"`` (the
        MNI152 templates; needs nilearn) or ``"auto"`` (``"mni"`` when nilearn imports).
    aif_peak : float, optional
        Fix the AIF's first-pass peak (HU) instead of drawing it in 250-600.
    noise : bool
        Add noise (False gives the noise-free study).
    psf_fwhm_mm : float
        In-plane blur of the scanner (0 for none).
    noise_matrix : int, optional
        Pixels across the field of view of the reconstruction whose noise ``mas`` sets (for
        a clinical scanner 512). A subject on a coarser grid then carries that image's noise
        averaged into its larger pixels, as an image downsampled from it would (64 px: 3.6 HU
        at 150 mAs instead of 8.4). None: ``mas``'s noise on the subject's own grid.
    rho, kh : float
        Tissue density (g/mL) and haematocrit factor of the indicator-dilution model.
    progress : bool
        Show a tqdm bar over slices.

    Returns
    -------
    PhantomSubject
    """
    params = draw_parameters(
        seed=seed, size=size, slices=slices, frames=frames, frame_interval=frame_interval, mas=mas,
        motion=motion, lesion=lesion, residues=residues, anatomy=anatomy,
        lesion_free_fraction=lesion_free_fraction, aif_peak=aif_peak, noise=noise,
        psf_fwhm_mm=psf_fwhm_mm, fov_mm=fov_mm, thickness_mm=thickness_mm,
        noise_matrix=noise_matrix, rho=rho, kh=kh)
    return simulate_subject(params, progress=progress)

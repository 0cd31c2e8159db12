"""Head templates for the phantom: tissue fractions on a 1 mm grid in MNI-like mm (RAS).

Two sources share one representation, :class:`Template`: a stack of fraction channels
(:data:`CHANNELS`) on a 1 mm grid with its affine. ``"procedural"`` builds a dependency-free
head from analytic shapes (ellipsoidal brain with a folded cortex, ventricles, deep grey nuclei,
Sylvian and interhemispheric fissures, skull and scalp). ``"mni"`` uses the MNI152 2009 grey and
white matter templates shipped with nilearn (loaded offline; see the licence notice in the package
documentation), with CSF derived from the brain mask and skull and scalp from the distance to it.
Both get the same vessel tree (arteries and sinuses as tubes), placed in MNI coordinates.

Licence notice of the MNI templates (``TEMPLATE_NOTICE``, also written into each subject's
params when they are used): MNI ICBM152 non-linear symmetric 2009a templates, Copyright (C)
1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill
University, distributed with nilearn. Permission to use, copy, modify and distribute them is
granted by the authors provided the copyright notice appears in all copies; they are provided
"as is" without warranty. References: Fonov et al., NeuroImage 54:313-327 (2011),
doi:10.1016/j.neuroimage.2010.07.033; Fonov et al., NeuroImage 47:S102 (2009).
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ctperf.errors import ValidationError

__all__ = ["CHANNELS", "TEMPLATE_NOTICE", "Template", "available_sources", "check_source",
           "load_template", "sample_template"]

log = logging.getLogger(__name__)

TEMPLATE_NOTICE = (
    "MNI ICBM152 non-linear symmetric 2009a templates (grey and white matter, brain mask), "
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal "
    "Neurological Institute, McGill University; distributed with nilearn. Fonov et al., "
    "NeuroImage 54:313-327 (2011), doi:10.1016/j.neuroimage.2010.07.033."
)

#: Fraction channels of a template (bone is a density-weighted fraction: 1 = cortical bone).
CHANNELS: tuple[str, ...] = ("gm", "wm", "csf", "bone", "soft", "artery", "vein")

# Arteries: polylines (MNI mm) and radius (mm). Diameters 2-4 mm as on a CTA.
_ARTERIES: list[tuple[str, list[tuple[float, float, float]], float]] = []
for _s, _side in ((1, "R"), (-1, "L")):
    _ARTERIES += [
        (f"ICA_{_side}", [(_s * 14, 0, -30), (_s * 14, 2, -12)], 2.0),
        (f"M1_{_side}", [(_s * 14, 2, -12), (_s * 30, 4, -10), (_s * 38, 2, -6)], 1.6),
        (f"M2sup_{_side}", [(_s * 38, 2, -6), (_s * 41, 10, 6), (_s * 44, 14, 22),
                            (_s * 48, 8, 40)], 1.2),
        (f"M2inf_{_side}", [(_s * 38, 2, -6), (_s * 40, -6, 5), (_s * 43, -16, 20),
                            (_s * 46, -28, 36)], 1.2),
        (f"A1_{_side}", [(_s * 14, 2, -12), (_s * 3, 12, -8)], 1.2),
        (f"A2_{_side}", [(_s * 2.5, 12, -8), (_s * 2.5, 30, 5), (_s * 2.5, 36, 20),
                         (_s * 2.5, 22, 36), (_s * 2.5, -10, 42), (_s * 2.5, -40, 40)], 1.1),
        (f"PCA_{_side}", [(0, -18, -20), (_s * 10, -25, -12), (_s * 20, -40, -5),
                          (_s * 18, -60, 2), (_s * 12, -82, 8)], 1.2),
    ]
_ARTERIES.append(("basilar", [(0, -12, -45), (0, -18, -20)], 1.6))

_VEINS: list[tuple[str, list[tuple[float, float, float]], float]] = [
    ("straight", [(0, -36, 12), (0, -60, 8), (0, -92, -2)], 3.0),
    ("transverse_R", [(0, -100, -6), (30, -96, -10), (50, -76, -15), (58, -46, -20)], 4.0),
    ("transverse_L", [(0, -100, -6), (-30, -96, -10), (-50, -76, -15), (-58, -46, -20)], 4.0),
]
_SSS_RADIUS = 4.5


@dataclass(frozen=True, eq=False)
class Template:
    """Tissue fractions on a 1 mm grid.

    Attributes
    ----------
    data : ndarray, float32, shape (C, X, Y, Z)
        One channel per name in :data:`CHANNELS`, fractions in [0, 1] (index order x, y, z).
    affine : ndarray, shape (4, 4)
        Index ``(i, j, k, 1)`` -> MNI mm.
    source : str
        ``"procedural"`` or ``"mni"``.
    """

    data: np.ndarray
    affine: np.ndarray
    source: str


def available_sources() -> list[str]:
    """Template sources usable here: always ``"procedural"``, ``"mni"`` when nilearn imports."""
    try:
        import nilearn  # noqa: F401
    except ImportError:
        return ["procedural"]
    return ["procedural", "mni"]


def _grid(shape: tuple[int, int, int], origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 3] = origin
    return affine


def _seg_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def _draw_tube(vol: np.ndarray, affine: np.ndarray, points: np.ndarray, radius: float) -> None:
    """Max-combine a soft-edged tube (fraction of each 1 mm voxel inside) into ``vol``."""
    inv = np.linalg.inv(affine)
    for a, b in itertools.pairwise(points):
        lo = np.floor((inv[:3, :3] @ np.minimum(a, b) + inv[:3, 3]) - radius - 2).astype(int)
        hi = np.ceil((inv[:3, :3] @ np.maximum(a, b) + inv[:3, 3]) + radius + 2).astype(int)
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, np.array(vol.shape) - 1)
        if np.any(hi < lo):
            continue
        idx = np.stack(np.meshgrid(*[np.arange(lo[d], hi[d] + 1) for d in range(3)],
                                   indexing="ij"), axis=-1)
        mm = idx @ affine[:3, :3].T + affine[:3, 3]
        frac = np.clip(radius + 0.5 - _seg_distance(mm, a, b), 0.0, 1.0).astype(np.float32)
        box = tuple(slice(lo[d], hi[d] + 1) for d in range(3))
        np.maximum(vol[box], frac, out=vol[box])


def _sss_path(brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Superior sagittal sinus centre line: 4 mm outside the brain along the midline arc."""
    centre = np.array([0.0, -17.0, 12.0])
    theta = np.deg2rad(np.linspace(-8, 205, 60))  # 0 = anterior, 90 = vertex, 180 = posterior
    radii = np.arange(20.0, 130.0, 0.5)
    # midline brain-ness: max over |x| <= 8 mm, so the fissure does not stop the ray
    inv = np.linalg.inv(affine)
    ray = np.stack([np.zeros((theta.size, radii.size)),
                    centre[1] + np.cos(theta)[:, None] * radii,
                    centre[2] + np.sin(theta)[:, None] * radii], axis=-1)
    inside = np.zeros(ray.shape[:2], dtype=bool)
    for x in (-8.0, -4.0, 0.0, 4.0, 8.0):
        pts = ray.copy()
        pts[..., 0] = x
        ijk = pts @ inv[:3, :3].T + inv[:3, 3]
        inside |= ndi.map_coordinates(brain, ijk.reshape(-1, 3).T, order=1).reshape(
            inside.shape) > 0.5
    last = np.where(inside.any(axis=1), radii.size - 1 - np.argmax(inside[:, ::-1], axis=1), 0)
    r = radii[last] + 4.0
    return np.stack([np.zeros_like(r), centre[1] + np.cos(theta) * r,
                     centre[2] + np.sin(theta) * r], axis=-1)


def _add_vessels(data: np.ndarray, affine: np.ndarray) -> None:
    art = np.zeros(data.shape[1:], dtype=np.float32)
    vein = np.zeros_like(art)
    for _, pts, r in _ARTERIES:
        _draw_tube(art, affine, np.asarray(pts, dtype=float), r)
    for _, pts, r in _VEINS:
        _draw_tube(vein, affine, np.asarray(pts, dtype=float), r)
    _draw_tube(vein, affine, _sss_path(data[0] + data[1], affine), _SSS_RADIUS)
    vein = np.minimum(vein, 1.0 - art)
    keep = 1.0 - art - vein
    data[:5] *= keep
    data[5] = art
    data[6] = vein


def _ellipsoid_depth(p: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Signed radial distance (mm) to an ellipsoid's surface; positive inside."""
    d = p - centre
    rho = np.sqrt(np.sum((d / axes) ** 2, axis=-1))
    return np.linalg.norm(d, axis=-1) * (1.0 / np.maximum(rho, 1e-6) - 1.0)


def _cosine_field(p: np.ndarray, rng: np.random.Generator, n: int, wavelength: float
                  ) -> np.ndarray:
    k = rng.standard_normal((n, 3))
    k *= (2 * np.pi / wavelength) / np.linalg.norm(k, axis=1, keepdims=True)
    phase = rng.uniform(0, 2 * np.pi, n)
    out = np.zeros(p.shape[:-1], dtype=np.float32)
    for kk, ph in zip(k, phase, strict=True):
        out += np.cos(p @ kk.astype(np.float32) + np.float32(ph))
    return out * np.float32(np.sqrt(2.0 / n))


@functools.lru_cache(maxsize=1)
def _procedural() -> Template:
    shape = (181, 217, 131)
    affine = _grid(shape, (-90.0, -126.0, -40.0))
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape],
                               indexing="ij"), axis=-1)
    p = ijk + np.asarray(affine[:3, 3], dtype=np.float32)
    del ijk
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    rng = np.random.default_rng(1952)  # the template itself is fixed; subjects vary by warp
    centre = np.array([0.0, -17.0, 12.0], dtype=np.float32)
    axes = np.array([68.0, 85.0, 62.0], dtype=np.float32)
    bumps = 2.5 * _cosine_field(p, rng, 8, 90.0)
    depth = _ellipsoid_depth(p, centre, axes) + bumps
    icv = _ellipsoid_depth(p, centre, axes + 3.0) + bumps  # a 3 mm CSF layer all round
    brain = depth > 0
    fold = _cosine_field(p, rng, 16, 17.0)
    sulc_depth = 11.0 + 5.0 * _cosine_field(p, rng, 6, 60.0)
    sulcus = (np.abs(fold) < 0.09) & (depth < sulc_depth)
    gm = brain & ((depth < 3.2) | ((np.abs(fold) < 0.6) & (depth < sulc_depth + 3.0)))
    fissure = (np.abs(x) < 0.9) & ((z > 30) | (y > 32) | (y < -48))
    gm |= brain & (np.abs(x) < 4.5) & ((z > 26) | (y > 28) | (y < -44))
    ax = np.abs(x)
    sylvian = (ax > 36) & (y > -32) & (y < 22) & (np.abs(z - 2 - 0.3 * y) < 1.6)
    insula = (ax > 32) & (ax < 37) & (y > -26) & (y < 20) & (z > -10) & (z < 20)
    gm |= brain & (insula | ((ax > 34) & (np.abs(z - 2 - 0.3 * y) < 4.5) & (y > -32) & (y < 22)))
    # deep nuclei and ventricles live in a central box; compute them there only
    box = (slice(55, 126), slice(56, 170), slice(20, 76))  # x -35..35, y -70..43, z -20..35
    pb = p[box]
    deep_b = np.zeros(pb.shape[:-1], dtype=bool)
    vent_b = np.zeros_like(deep_b)
    for s in (1.0, -1.0):
        q = pb - np.array([s * 25, 2, 2], dtype=np.float32)
        deep_b |= np.sum((q / np.array([6, 14, 9], dtype=np.float32)) ** 2, axis=-1) < 1
        q = pb - np.array([s * 11, -18, 6], dtype=np.float32)
        deep_b |= np.sum((q / np.array([8, 13, 8], dtype=np.float32)) ** 2, axis=-1) < 1
        deep_b |= _seg_distance(pb, np.array([s * 16, 18, 12]), np.array([s * 17, -8, 20])) < 4.5
        vent_b |= _seg_distance(pb * np.array([1, 1, 0.55], dtype=np.float32),
                                np.array([s * 9, 14, 18 * 0.55]),
                                np.array([s * 13, -30, 22 * 0.55])) < 4.0
        vent_b |= _seg_distance(pb, np.array([s * 9, 26, 12]), np.array([s * 9, 10, 18])) < 4.5
        vent_b |= _seg_distance(pb, np.array([s * 16, -30, 20]),
                                np.array([s * 21, -56, 10])) < 3.5
    bx, by, bz = pb[..., 0], pb[..., 1], pb[..., 2]
    vent_b |= (np.abs(bx) < 1.5) & (by > -25) & (by < 5) & (bz > -12) & (bz < 10)
    deep = np.zeros_like(brain)
    vent = np.zeros_like(brain)
    deep[box] = deep_b
    vent[box] = vent_b
    csf_in = (sulcus | fissure | sylvian | vent) & brain
    gm = (gm | deep) & ~csf_in
    wm = brain & ~gm & ~csf_in
    csf = (icv > 0) & ~gm & ~wm
    out = -icv
    table = (out > 0) & (out < 7.0)
    bone = np.where(table, np.where((out > 1.6) & (out < 5.4), 0.55, 1.0), 0.0)
    soft = (out >= 7.0) & (out < 12.5)
    data = np.stack([gm, wm, csf, bone, soft]).astype(np.float32)
    del p, x, y, z, depth, icv, fold
    data = ndi.gaussian_filter(data, (0, 0.45, 0.45, 0.45))
    data = np.concatenate([data, np.zeros((2, *shape), dtype=np.float32)])
    _add_vessels(data, affine)
    return Template(data=data, affine=affine, source="procedural")


@functools.lru_cache(maxsize=1)
def _mni() -> Template:
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm_img = datasets.load_mni152_wm_template(resolution=1)
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    affine = np.asarray(gm_img.affine, dtype=float)
    if not np.allclose(np.abs(np.diag(affine)[:3]), 1.0):
        raise ValidationError("expected the 1 mm MNI152 templates from nilearn")
    gm = np.asarray(gm_img.dataobj, dtype=np.float32)
    wm = np.asarray(wm_img.dataobj, dtype=np.float32)
    mask = ndi.binary_fill_holes(np.asarray(mask_img.dataobj) > 0)
    total = np.maximum(gm + wm, 1.0)
    gm, wm = gm / total * mask, wm / total * mask
    # the skull follows a closed (8 mm ball) brain outline, not every sulcus and notch
    grown = ndi.distance_transform_edt(~mask) <= 8.0
    closed = ndi.distance_transform_edt(grown) > 8.0
    dist = ndi.distance_transform_edt(~(closed | mask)).astype(np.float32)
    del grown, closed
    icv = dist <= 3.0
    csf = np.where(icv, 1.0 - gm - wm, 0.0)
    out = dist - 3.0
    table = (out > 0) & (out < 7.0)
    bone = np.where(table, np.where((out > 1.6) & (out < 5.4), 0.55, 1.0), 0.0)
    soft = (out >= 7.0) & (out < 12.5)
    data = np.stack([gm, wm, csf, ndi.gaussian_filter(bone.astype(np.float32), 0.45),
                     ndi.gaussian_filter(soft.astype(np.float32), 0.45),
                     np.zeros_like(gm), np.zeros_like(gm)]).astype(np.float32)
    _add_vessels(data, affine)
    return Template(data=data, affine=affine, source="mni")


def check_source(source: str) -> None:
    """Refuse a template source that cannot be used here (``"mni"`` without nilearn)."""
    if source == "mni" and "mni" not in available_sources():
        raise ValidationError("the MNI anatomy needs nilearn (pip install 'ctperf[anatomy]'); "
                              "or use the procedural one (--anatomy procedural)")


def load_template(source: str = "procedural") -> Template:
    """The head template: ``"procedural"``, ``"mni"`` (needs nilearn) or ``"auto"``.

    ``"auto"`` picks ``"mni"`` when nilearn is installed, else ``"procedural"``; the default is
    ``"procedural"``, so that a seed gives the same subject whatever is installed. Cached per
    process (building takes a few seconds).
    """
    if source == "auto":
        source = "mni" if "mni" in available_sources() else "procedural"
    if source == "procedural":
        return _procedural()
    if source == "mni":
        check_source(source)
        return _mni()
    raise ValidationError(f"anatomy must be 'auto', 'procedural' or 'mni', got {source!r}")


def sample_template(template: Template, points_mm: np.ndarray) -> np.ndarray:
    """Trilinear fractions at template points.

    Parameters
    ----------
    template : Template
    points_mm : ndarray, shape (..., 3)
        MNI mm coordinates.

    Returns
    -------
    ndarray, float32, shape (C, ...)
        One fraction per channel of :data:`CHANNELS`; zero outside the template grid.
    """
    inv = np.linalg.inv(template.affine)
    coords = inv[:3, :3] @ points_mm.reshape(-1, 3).T + inv[:3, 3:]  # (3, N), contiguous
    out = np.empty((template.data.shape[0], coords.shape[1]), dtype=np.float32)
    for c in range(template.data.shape[0]):
        out[c] = ndi.map_coordinates(template.data[c], coords, order=1, mode="constant",
                                     cval=0.0)
    return out.reshape(template.data.shape[0], *points_mm.shape[:-1])

"""Motion correction: recover known rigid motion of a synthetic head (target registration error)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from ctperf.errors import ValidationError
from ctperf.preprocess.registration import correct_motion
from ctperf.preprocess.transforms import (
    apply_transforms,
    frame_displacement,
    make_transform,
    to_sitk_image,
)
from ctperf.types import CTPSeries


def _sig(d: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * d))


#: The head's centre lies below the 40 mm slab, as in a scan at the level of the basal ganglia, so
#: the skull's cross-section changes from slice to slice.
HEAD_CENTRE = np.array([0.0, 10.0, -30.0])


def head_hu(points: np.ndarray, blobs: list[tuple[np.ndarray, float, float]], *,
            sharpness: float = 60.0) -> np.ndarray:
    """Smooth head-like HU at points (N, 3) in mm: air, skull shell, brain with blob texture.

    ``sharpness`` sets the skull's edges: 60 blurs them over about 10 mm (10-90 %), 640 over
    about 1 mm, as a soft reconstruction kernel leaves them.
    """
    x, y, z = (points - HEAD_CENTRE).T
    r_out = np.sqrt((x / 80) ** 2 + (y / 95) ** 2 + (z / 70) ** 2)
    r_in = np.sqrt((x / 72) ** 2 + (y / 87) ** 2 + (z / 62) ** 2)
    inside = _sig((1 - r_out) * sharpness)
    brain = _sig((1 - r_in) * sharpness)
    hu = -1000 * (1 - inside) + 900 * (inside - brain) + 30 * brain
    for centre, sd, amp in blobs:
        hu += amp * brain * np.exp(-((points - centre) ** 2).sum(1) / (2 * sd * sd))
    return hu


def make_blobs(rng: np.random.Generator, n: int = 80) -> list[tuple[np.ndarray, float, float]]:
    """Grey/white/CSF-like texture: gaussian blobs of 3-8 mm, +-10 to 30 HU."""
    centres = rng.uniform([-60, -70, -30], [60, 70, 30], size=(n, 3))
    return [(c, float(rng.uniform(3, 8)), float(rng.choice([-30, -10, 10, 20])))
            for c in centres]


def moving_study(rng: np.random.Generator, params: np.ndarray, *, shape=(8, 96, 96),
                 spacing=(5.0, 2.0, 2.0), noise=5.0,
                 sharpness: float = 60.0) -> tuple[CTPSeries, np.ndarray]:
    """Frames of one head under rigid motions ``params`` (T, 6) about the volume centre.

    Frame t is the head seen through transform T_t (first frame -> frame t), each slice averaged
    over its 5 mm thickness (4 sub-samples) as a scanner would. Returns the series and the centre.
    """
    blobs = make_blobs(rng)
    nz, ny, nx = shape
    dz, dy, dx = spacing
    affine = np.diag([dx, dy, dz, 1.0])
    affine[:3, 3] = [-(nx - 1) * dx / 2, -(ny - 1) * dy / 2, -(nz - 1) * dz / 2]
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    centres = (np.c_[ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)] @ affine.T)[:, :3]
    center = np.zeros(3)
    frames = []
    for p in params:
        tx = make_transform(p, center)
        m = np.asarray(tx.GetMatrix()).reshape(3, 3)
        acc = np.zeros(len(centres))
        for sub in (-0.375, -0.125, 0.125, 0.375):
            y = centres + np.array([0.0, 0.0, sub * dz])
            x = (y - center - p[3:]) @ np.linalg.inv(m).T + center  # T^-1(y)
            acc += head_hu(x, blobs, sharpness=sharpness) / 4
        frames.append(acc.reshape(shape) + noise * rng.standard_normal(shape))
    times = np.arange(len(params)) * 0.5
    return CTPSeries(hu=np.array(frames, dtype=np.float32), times=times, affine=affine), center


def brain_points(series: CTPSeries) -> np.ndarray:
    """Patient mm of the brain voxels of the first frame (soft tissue HU)."""
    mask = (series.hu[0] > -10) & (series.hu[0] < 90)
    zyx = np.argwhere(mask)
    return (np.c_[zyx[:, ::-1], np.ones(len(zyx))] @ series.affine.T)[:, :3]


def tre(est: np.ndarray, true: np.ndarray, center: np.ndarray, points: np.ndarray) -> float:
    """Mean |T_est(x) - T_true(x)| over points, in mm."""
    out = []
    for pe, pt in zip(est, true, strict=True):
        te, tt = make_transform(pe, center), make_transform(pt, center)
        a = np.array([te.TransformPoint(tuple(x)) for x in points[::50]])
        b = np.array([tt.TransformPoint(tuple(x)) for x in points[::50]])
        out.append(np.linalg.norm(a - b, axis=1).mean())
    return float(np.max(out))


#: In-plane motion (rotation about z, shifts) up to 5 degrees and 5 mm.
IN_PLANE = np.array([
    [0, 0, 0, 0, 0, 0],
    [0, 0, 5.0, 5.0, 0, 0],
    [0, 0, -5.0, -3.0, 4.0, 0],
    [0, 0, 3.0, 2.0, -5.0, 0.0],
])

#: Nodding and tilts up to 5 degrees with through-plane shifts (the hard case for 5 mm slices).
THROUGH_PLANE = np.array([
    [0, 0, 0, 0, 0, 0],
    [5.0, 0, 0, 0, 0, 2.0],
    [-3.0, 2.0, 4.0, 5.0, -3.0, 0.0],
    [2.0, 3.0, -2.0, 3.0, 3.0, 2.5],
])


def test_recovers_in_plane_motion(rng):
    series, center = moving_study(rng, IN_PLANE)
    result = correct_motion(series, workers=2)
    # the centre of rotation is the volume centre, which moving_study puts at the origin
    assert np.allclose(result.center_mm, center, atol=1e-6)
    points = brain_points(series)
    before = tre(np.zeros_like(IN_PLANE), IN_PLANE, center, points)
    after = tre(result.parameters, IN_PLANE, center, points)
    assert before > 4.0  # the motion is large (sanity check of the test itself)
    # issue 5 target: mean TRE over the brain < 0.5 mm after motion up to 5 mm / 5 degrees
    assert after < 0.5, (after, result.parameters)
    # Registered frames match the first frame: residual close to the 5 HU noise, far below the
    # residual of the moved frame.
    inner = np.s_[2:-2, 10:-10, 10:-10]
    resid_after = np.std(result.series.hu[2][inner] - series.hu[0][inner])
    resid_before = np.std(series.hu[2][inner] - series.hu[0][inner])
    assert resid_after < 0.3 * resid_before
    # reported displacement agrees with the applied motion over the same kind of points
    assert np.all(np.abs(result.displacement_mm - frame_displacement(
        IN_PLANE, center, points)[0]) < 1.0)


def test_apply_transforms_repeats_the_correction(rng):
    """Saved transforms applied again give the registered study; the true ones do as well."""
    series, center = moving_study(rng, IN_PLANE)
    result = correct_motion(series, workers=2)
    again = apply_transforms(series, result.transforms)
    # the same resampler on the same transforms (frame 0: identity, read at the grid points)
    assert np.allclose(again.hu, result.series.hu, atol=1e-3)
    assert again.meta["motion_corrected"] and not series.meta.get("motion_corrected")
    exact = apply_transforms(series, [None, *(make_transform(p, center) for p in IN_PLANE[1:])])
    assert np.array_equal(exact.hu[0], series.hu[0])
    # a frame kept at the identity is left as it is, bone and all, as correct_motion leaves it
    still = apply_transforms(series, [None, make_transform(np.zeros(6), center), None, None])
    assert np.array_equal(still.hu, series.hu)
    inner = np.s_[2:-2, 10:-10, 10:-10]
    # the true transforms leave the ~5 HU noise (x sqrt 2) and interpolation; no motion left
    for t in range(1, len(IN_PLANE)):
        resid = np.std(exact.hu[t][inner] - series.hu[0][inner])
        assert resid < 0.3 * np.std(series.hu[t][inner] - series.hu[0][inner]), (t, resid)
    with pytest.raises(ValidationError, match="3 transforms for 4 frames"):
        apply_transforms(series, result.transforms[:3])


def test_moved_frames_take_their_bone_from_the_first_frame():
    """Resampling a moved frame leaks no skull into the brain next to it, and nothing else moves.

    A head whose skull edges are blurred over about 1 mm, moved in plane (3 degrees and 3.2 mm:
    3.5 mm over the brain) and through plane (2 degrees and 1.5 mm: 2.0 mm), each frame imaged
    after the motion; the true transforms bring it back. Read plainly, the brain within 4 mm of
    the skull is off by 27 and 55 HU on average (up to 274 and 317 HU); with the first frame's
    bone, by 6.4 and 8.9 HU (up to 97 and 151 HU: the edge below 120 HU leaks what it holds).
    """
    from scipy import ndimage

    from ctperf.preprocess.transforms import resample_frame, static_bone

    motion = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 3.0, 2.5, -2.0, 0], [2.0, 0, 0, 0, 0, 1.5]])
    moving, center = moving_study(np.random.default_rng(3), motion, noise=0.0, sharpness=640)
    still, _ = moving_study(np.random.default_rng(3), np.zeros_like(motion), noise=0.0,
                            sharpness=640)
    ref = still.hu[0]
    skull = ref > 300
    inside = np.array([ndimage.binary_fill_holes(s) for s in skull]) & (ref > -100) & (ref < 120)
    edge = inside & (ndimage.distance_transform_edt(~skull, sampling=(1e6, 2.0, 2.0)) <= 4.0)
    # beyond a slice and the motion from any bone (also the next slice's, at the head's top)
    deep = inside & (ndimage.distance_transform_edt(~skull, sampling=(5.0, 2.0, 2.0)) > 10.0)
    assert edge.sum() > 300 and deep.sum() > 10_000  # the test's own head has both
    corrected = apply_transforms(moving, [None, *(make_transform(p, center) for p in motion[1:])])
    for t in (1, 2):
        plain = resample_frame(to_sitk_image(moving.hu[t], moving.affine),
                               make_transform(motion[t], center), 1)
        leak_plain = np.abs(plain - ref)[edge].mean()
        leak = np.abs(corrected.hu[t] - ref)[edge].mean()
        assert leak_plain > 20.0  # the leak is there to be taken away (27 and 55 HU)
        # measured 0.23 and 0.16 of the plain read: the skull's blurred edge below 120 HU, in
        # the tissue, is read plainly and leaks what it holds
        assert leak < 0.3 * leak_plain, (t, leak, leak_plain)
        # away from the skull the cubic read is at least as close to the still head as the
        # linear one (measured 0.001 against 0.045 HU in plane, 0.20 against 0.24 through
        # plane)
        err, err_plain = (np.abs(r[deep] - ref[deep]).mean() for r in (corrected.hu[t], plain))
        assert err <= err_plain, (t, err, err_plain)
    # a frame read at the identity is the frame, bone and all
    bone = static_bone(ref, still.affine)
    same = resample_frame(to_sitk_image(moving.hu[0], moving.affine), make_transform(
        np.zeros(6), center), 1, bone=bone)
    assert np.allclose(same, moving.hu[0], atol=1e-3)


def test_a_moved_small_artery_keeps_its_peak():
    """An artery 2-3 voxels wide (Gaussian profile, SD 1.2 mm on 2 mm pixels, 400 HU over 30),
    imaged after half a voxel of motion in x and y and brought back by the true transform:
    linear interpolation averages it with the tissue beside it (its peak 22 % low, measured),
    the cubic B-spline keeps it (3 % high); the AIF is read from such arteries."""
    from ctperf.preprocess.transforms import resample_frame, static_bone

    n, dx = 64, 2.0
    affine = np.diag([dx, dx, 5.0, 1.0])
    affine[:3, 3] = [-(n - 1) * dx / 2, -(n - 1) * dx / 2, -7.5]
    jj, ii = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    x, y = ii * dx + affine[0, 3], jj * dx + affine[1, 3]

    def head(shift: tuple[float, float], enhancement: float = 400.0) -> np.ndarray:
        u, v = x - shift[0], y - shift[1]
        r = np.hypot(u / 56.0, v / 56.0)
        skull = 1000.0 * ((r > 0.9) & (r < 1.0)) - 1030.0 * (r >= 1.0)
        artery = enhancement * np.exp(-(u ** 2 + (v - 10.0) ** 2) / (2 * 1.2 ** 2))
        return np.broadcast_to(30.0 + skull + artery, (4, n, n)).astype(np.float32)

    still, moved = head((0.0, 0.0)), head((1.0, 1.0))
    bone = static_bone(np.stack([head((0.0, 0.0), 0.0), still]), affine)  # before the bolus
    tx = make_transform([0, 0, 0, 1.0, 1.0, 0], np.zeros(3))
    img = to_sitk_image(moved, affine)
    brain = np.hypot(x / 56.0, y / 56.0) < 0.85
    peak = np.unravel_index(np.argmax(np.where(brain, still[1], 0.0)), brain.shape)
    linear = resample_frame(img, tx, 1)[1][peak] - 30.0
    cubic = resample_frame(img, tx, 1, bone=bone)[1][peak] - 30.0
    true = still[1][peak] - 30.0
    assert linear < 0.85 * true  # the loss is there to be kept (22 %)
    assert abs(cubic / true - 1.0) < 0.05, (cubic, linear, true)


def test_two_slices_are_read_linearly(rng):
    """SimpleITK's B-spline read a study of two slices from outside it at random (a probe: NaN
    or infinities in whole rows in 6 of 10 runs, once finite 3.4e38): two slices are read
    linearly, one or three and more by the cubic B-spline."""
    from ctperf.preprocess.transforms import resample_frame, static_bone

    tx = make_transform([0, 0, 2.0, 1.3, -0.7, 0], np.zeros(3))
    for slices, cubic in ((1, True), (2, False), (3, True)):
        hu = (40.0 + 10.0 * rng.standard_normal((slices, 48, 48))).astype(np.float32)
        affine = np.diag([2.0, 2.0, 5.0, 1.0])
        bone = static_bone(hu, affine)
        assert not bone.near_edges.any()  # no bone, no air: nothing read linearly for them
        img = to_sitk_image(hu, affine)
        read = resample_frame(img, tx, 1, bone=bone)
        assert np.isfinite(read).all()
        assert np.array_equal(read, resample_frame(img, tx, 1)) != cubic, slices


def test_noise_and_contrast_are_never_bone(rng):
    """Only voxels next to steady bone are bone: 30 HU of noise over a 35 HU brain never is,
    nor an artery that a late start caught full of contrast in the first frame."""
    import SimpleITK as sitk

    from ctperf.preprocess.transforms import static_bone

    hu = 35.0 + 30.0 * rng.standard_normal((20, 4, 64, 64)).astype(np.float32)
    assert static_bone(hu, np.eye(4)).voxels == 0
    hu[:, :, 5:8, :] = 1200.0  # a skull
    hu[:, 2, 31, 31] = 1200.0  # a calcification
    washout = np.r_[400.0, 350, 250, 150, 100, 80, 60, 50, np.full(12, 45.0)]
    hu[:, :, 30:34, 40:44] = washout[:, None, None, None]  # an artery, the bolus already in
    hu[:, :, 8:10, 40:44] = washout[:, None, None, None]  # another against the skull (a canal)
    bone = sitk.GetArrayFromImage(static_bone(hu, np.eye(4)).mask) > 0.5
    assert bone[:, 5:8].all() and bone[2, 31, 31]
    assert not bone[:, 30:34, 40:44].any() and not bone[:, 8:10, 40:44].any()
    assert not bone[:, 15:25, 10:30].any()  # nor the brain between them


def test_a_transform_without_an_inverse_is_applied_plainly(rng):
    """A B-spline transform cannot move the first frame's bone: its frame is read plainly."""
    import SimpleITK as sitk

    from ctperf.preprocess.transforms import resample_frame, static_bone

    series, _ = moving_study(rng, np.zeros((2, 6)), shape=(4, 96, 96))
    assert static_bone(series.hu, series.affine).voxels > 1000  # a skull to move
    img = to_sitk_image(series.hu[1], series.affine)
    bspline = sitk.BSplineTransformInitializer(img, [2, 2, 2])
    bspline.SetParameters(list(rng.normal(0.0, 1.0, len(bspline.GetParameters()))))
    out = apply_transforms(series, [None, bspline])
    assert np.array_equal(out.hu[1], resample_frame(img, bspline, 1))
    assert not np.array_equal(out.hu[1], series.hu[1])  # it was applied


def test_reduces_through_plane_motion(rng):
    """Tilts of 5 mm slices are only partly recovered: TRE falls, but not below 0.5 mm.

    Each slice of this head integrates the moved anatomy over 5 mm, which no interpolation of
    the first frame's thick slices reproduces at the tilted skull: started at the true transform
    the fit drifts by 2 mm, so the residual is a limit of the model, not of the optimiser.
    """
    series, center = moving_study(rng, THROUGH_PLANE)
    result = correct_motion(series, workers=2)
    points = brain_points(series)
    before = tre(np.zeros_like(THROUGH_PLANE), THROUGH_PLANE, center, points)
    after = tre(result.parameters, THROUGH_PLANE, center, points)
    # Measured 1.8-2.7 mm TRE per frame from 6.4 mm before; 3.5 mm and a 0.6
    # ratio leave room for the spread over seeds of the random sampling and of the texture.
    assert after < 3.5 and after < 0.6 * before, (before, after)


def test_displacement_matches_transform(rng):
    points = rng.uniform(-50, 50, size=(500, 3))
    params = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 0, 3.0, 4.0, 0], [0, 0, 90.0, 0, 0, 0]])
    mean, mx = frame_displacement(params, np.zeros(3), points)
    assert mean[0] == 0 and mx[0] == 0
    assert np.allclose([mean[1], mx[1]], 5.0)  # pure shift (3, 4, 0) is 5 mm everywhere
    # 90 degrees about z moves a point by sqrt(2) times its distance from the z axis
    expected = np.sqrt(2) * np.linalg.norm(points[:, :2], axis=1)
    assert mean[2] == pytest.approx(expected.mean(), rel=1e-9)
    assert mx[2] == pytest.approx(expected.max(), rel=1e-9)


def test_sitk_image_geometry_follows_affine():
    affine = np.array([[0, -0.5, 0, 10], [0.5, 0, 0, -20], [0, 0, 5, 3], [0, 0, 0, 1.0]])
    img = to_sitk_image(np.zeros((4, 6, 8), np.float32), affine)
    assert img.GetSize() == (8, 6, 4)
    for ijk in [(0, 0, 0), (7, 5, 3), (2, 1, 3)]:
        expected = affine @ np.r_[ijk, 1.0]
        assert np.allclose(img.TransformIndexToPhysicalPoint(ijk), expected[:3])


def test_static_study_stays_put(small_series):
    result = correct_motion(small_series.replace(hu=np.repeat(small_series.hu[:1], 3, 0),
                                                 times=small_series.times[:3]), workers=1)
    # identical frames: any movement is optimiser noise, well under a hundredth of a voxel
    assert result.max_displacement_mm.max() < 0.05
    assert np.allclose(result.series.hu[1], small_series.hu[0], atol=0.5)


def test_bad_options(small_series):
    with pytest.raises(ValidationError, match="one sample count per level"):
        correct_motion(small_series, levels=(8, 1), samples=(2000,))
    with pytest.raises(ValidationError, match="reach_mm"):
        correct_motion(small_series, reach_mm=0.0)
    with pytest.raises(ValidationError, match="min_gain"):
        correct_motion(small_series, min_gain=0.0)
    with pytest.raises(ValidationError, match="check_sigma_px"):
        correct_motion(small_series, check_sigma_px=(2.0, 2.0))


def phantom_tre(subject, parameters, center) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame mean TRE over the brain (mm) of estimated vs the phantom's applied motion,
    and the mean displacement before correction."""
    from ctperf.phantom.geometry import rigid_matrix

    zyx = np.argwhere(subject.masks["brain"])[::7]
    pts = (np.c_[zyx[:, ::-1], np.ones(len(zyx))] @ subject.series.affine.T)[:, :3]
    tre, before = [], []
    for est, true in zip(parameters, subject.motion, strict=True):
        m = rigid_matrix(true[:3], true[3:])  # the phantom moves x -> R x + s (slab centre 0)
        moved = pts @ m[:3, :3].T + m[:3, 3]
        r = np.asarray(make_transform(est, center).GetMatrix()).reshape(3, 3)
        found = (pts - center) @ r.T + center + est[3:]
        tre.append(np.linalg.norm(found - moved, axis=1).mean())
        before.append(np.linalg.norm(moved - pts, axis=1).mean())
    return np.array(tre), np.array(before)


def _subset(subject, frames: list[int]):
    """The subject's series and true motion restricted to ``frames``."""
    series = subject.series
    return series.replace(hu=series.hu[frames], times=series.times[frames]), \
        subject.motion[frames]


def _bolus_frames(subject) -> list[int]:
    """Frames before the bolus, at the arterial and venous peaks and at the end (worst motion)."""
    n = subject.series.n_frames
    art, vein = int(np.argmax(subject.aif)), int(np.argmax(subject.vof))
    return sorted({0, 1, art - 2, art, art + 2, vein, (vein + n) // 2, n - 1})


@pytest.fixture(scope="module")
def bolus_phantoms():
    """The same 128-px phantom with an MCA lesion, still and with mild motion."""
    from ctperf.phantom import generate_subject

    kwargs = {"seed": 3, "size": 128, "slices": 8, "lesion": True}
    return {m: generate_subject(motion=m, **kwargs) for m in ("none", "mild")}


def test_bolus_does_not_invent_motion(bolus_phantoms):
    """A still head whose vessels fill with contrast (arteries +400 HU at the peak) stays put."""
    subject = bolus_phantoms["none"]
    frames = _bolus_frames(subject)
    series, _ = _subset(subject, frames)
    # the subset does hold the bolus: arteries enhance by well over 100 HU at the arterial peak
    artery = subject.masks["artery"]
    assert (series.hu[:, artery].mean(1) - series.hu[0, artery].mean()).max() > 100
    result = correct_motion(series, workers=2)
    # issue target: no frame moves any brain voxel by 0.3 mm or more. Measured 0.0 mm: every
    # fit (0.02-0.6 mm, depending on library versions) made the check metric worse, so every
    # frame keeps the identity; 0.1 mm would still leave a wide margin.
    assert result.max_displacement_mm.max() < 0.1, (result.decision, result.max_displacement_mm)


def test_a_head_moved_millimetres_on_a_small_study_is_corrected():
    """A 64 px, 3-slice phantom moved 2-3 degrees and 2-4 mm in plane (6-10 mm through plane):
    the fit took 89-97 % of the check metric away, but at under three standard errors (the
    gain sits at the skull, in a few blocks), so the frames were kept as they were, unflagged,
    and preprocess reported 0 mm. A gain of half the metric or more is now clear."""
    from ctperf.phantom import generate_subject

    subject = generate_subject(seed=11, size=64, slices=3, frames=40, motion="severe")
    series, motion = _subset(subject, [0, 29, 30, 35])
    result = correct_motion(series, workers=2)
    assert all(d in ("in-plane", "rigid") for d in result.decision[1:]), result.decision
    sub = SimpleNamespace(masks=subject.masks, series=series, motion=motion)
    tre, before = phantom_tre(sub, result.parameters, result.center_mm)
    # measured: 5.6-6.6 mm mean displacement over the brain before, 3.3-3.9 mm after (the rest
    # lies through plane, which 3 slices of 5 mm barely fix); kept as it was, TRE = before
    assert before[1:].min() > 4.0 and np.all(tre[1:] < 0.8 * before[1:]), (tre, before)


def test_mild_motionphantom_tre(bolus_phantoms):
    subject = bolus_phantoms["mild"]
    series, motion = _subset(subject, _bolus_frames(subject))
    result = correct_motion(series, workers=2)
    sub = SimpleNamespace(masks=subject.masks, series=series, motion=motion)
    tre, before = phantom_tre(sub, result.parameters, result.center_mm)
    assert before.max() > 0.5  # the late frames have moved (sanity check of the test)
    # issue target: mean TRE over the brain < 0.5 mm (measured 0.09 mean, 0.19 worst frame:
    # the check leaves the 0.05-0.17 mm of motion of the early frames uncorrected)
    assert tre.mean() < 0.5 and tre.max() < 0.5, tre


def test_enhancing_voxels_are_vessels_not_moving_edges(bolus_phantoms):
    """Arteries are found; the skull of a moving head is not mistaken for enhancement."""
    from scipy import ndimage

    from ctperf.preprocess.registration import _enhancing

    still = bolus_phantoms["none"].series
    found = _enhancing(still.hu, still.spacing, reach_mm=5.0, threshold_hu=40.0)
    artery = bolus_phantoms["none"].masks["artery"]
    # nearly every artery voxel (partial volume 0.4-1 of +150-600 HU) exceeds 40 HU
    assert found[artery].mean() > 0.9
    # Severe motion (up to ~5 mm) moves the skull's 1,500 HU edges: they must not be flagged
    # away from the vessels' margin. The motion is imposed on a frame-0-only copy of the still
    # study (no contrast at all), so every flagged voxel is a false positive.
    from ctperf.phantom.acquisition import apply_motion

    frame0 = still.hu[0]
    moves = np.array([[0, 0, 0, 0, 0, 0], [2.0, 0.5, 2.0, 1.0, 3.0, 1.0],
                      [-2.0, 0, -2.0, -3.0, 1.0, -1.5]])
    hu = np.stack([apply_motion(frame0, still.affine, p) for p in moves])
    flagged = _enhancing(hu, still.spacing, reach_mm=5.0, threshold_hu=40.0)
    # apply_motion repeats the edge slices through plane: judge the inner slices only
    inner = np.zeros_like(flagged)
    inner[1:-1] = True
    skull = ndimage.binary_dilation(frame0 > 300, iterations=2) & inner
    # at most 1 % of the skull and its rim: isolated noise peaks (8 HU noise, 3 frames)
    assert flagged[skull].mean() < 0.01, flagged[skull].mean()


@pytest.mark.slow
@pytest.mark.parametrize(("motion", "size", "seed"), [("none", 256, 3), ("mild", 128, 3),
                                                      ("severe", 128, 3), ("severe", 128, 5)])
def test_phantom_full_study(motion, size, seed):
    """All 89 frames of a phantom with a bolus (0.9 or 1.8 mm pixels, 5 mm slices)."""
    from ctperf.phantom import generate_subject

    subject = generate_subject(seed=seed, size=size, slices=8, motion=motion, lesion=True)
    result = correct_motion(subject.series, workers=2)
    assert np.allclose(result.center_mm, 0.0, atol=1e-6)  # the phantom's slab centre
    tre, before = phantom_tre(subject, result.parameters, result.center_mm)
    if motion == "none":
        # issue target 0.3 mm for the largest displacement of any brain voxel (measured 0.00:
        # every frame keeps the identity)
        assert result.max_displacement_mm.max() < 0.3, result.max_displacement_mm.max()
    else:
        assert before.max() > 1.0  # the head did move (sanity check of the test)
    # issue target: mean TRE over the brain < 0.5 mm (measured 0.12-0.16 mm mean over frames,
    # worst frame 0.24-0.44 mm: motion below ~0.3 mm is left by the check); the worst frame is
    # held to 1 mm
    assert tre.mean() < 0.5 and tre.max() < 1.0, (tre.mean(), tre.max())


def phantom_transforms(subject) -> list:
    """The phantom's true motion as registration transforms (None for a still frame)."""
    import SimpleITK as sitk

    from ctperf.phantom.geometry import rigid_matrix

    out = []
    for p in subject.motion:
        if not np.any(p):
            out.append(None)
            continue
        m = rigid_matrix(p[:3], p[3:])  # head point x -> R x + s, slab centre at 0
        out.append(sitk.AffineTransform(m[:3, :3].ravel().tolist(), m[:3, 3].tolist()))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("motion", "seed"), [("mild", 3), ("severe", 3)])
def test_nlr_maps_after_correction_match_still_phantom(motion, seed):
    """Issue 5: NLR maps of a moving phantom after correction within 5 % of the still one.

    Severe motion (3 degrees, 4.5 mm here) misses that, and so does resampling with the true
    transforms: 5 mm slices moved through plane and read back by interpolation are smoothed
    along z, which takes enhancement out of the tissue. The correction is held to that
    exact-transform result.
    """
    from scipy import ndimage

    from ctperf.perfusion import compute_maps
    from ctperf.phantom import generate_subject

    kwargs = {"seed": seed, "size": 128, "slices": 8, "frames": 89}
    moving = generate_subject(motion=motion, **kwargs)
    still = generate_subject(motion="none", **kwargs)  # same anatomy, noise and bolus
    corrected = correct_motion(moving.series, workers=2).series
    exact = apply_transforms(moving.series, phantom_transforms(moving))
    brain = moving.masks["brain"]
    # Venous voxels within 2 pixels of bone are left out of the VOF: any sub-voxel resampling
    # (the phantom's motion and its correction both interpolate) mixes 1,500 HU of skull into
    # the sinus, which lifts the VOF's tail by ~60 HU and shrinks CBF and CBV by 25 % even
    # after a correction with 0.1 mm error. That is a matter of VOF selection, not registration.
    near_bone = ndimage.binary_dilation(still.series.hu[0] > 300, np.ones((1, 5, 5), bool))
    vessels = {"aif_mask": moving.masks["artery"], "vof_mask": moving.masks["vein"] & ~near_bone}
    ref, got, best = (compute_maps(s, brain_mask=brain, **vessels)
                      for s in (still.series, corrected, exact))
    for name in ("cbf", "cbv"):
        a, b, c = (np.nanmedian(m[name][brain]) for m in (ref, got, best))
        err, err_exact = abs(b / a - 1), abs(c / a - 1)
        if motion == "mild":
            # issue 5 target: median CBF and CBV within 5 % of the still phantom (measured
            # -1.0 % and +1.4 %; with the true transforms -1.6 % and +1.3 %)
            assert err < 0.05, (name, a, b)
        # Measured severe: CBF -6.5 %, CBV +4.2 %; with the true transforms -7.4 % and +3.9 %
        # (seed 5, 6.8 mm: +2.6 % and +12.1 %, true transforms +2.3 % and +12.5 %; the moved
        # frames' bone is the first frame's, read by cubic B-spline away from bone and air,
        # docs/preprocessing.md). 2 points allow for the registration's 0.1-0.2 mm error.
        assert err < err_exact + 0.02, (name, a, b, c)


def tile_study(rng: np.random.Generator, *, slices: int, size: int = 64, noise: float = 12.0,
               contrast: float = 0.0, motion: np.ndarray | None = None) -> CTPSeries:
    """A Kudo-style phantom: 7 x 7 tiles of enhancing tissue on a flat 30 HU field, no skull.

    Tile (i, j) has delay 0.5 i s, box residue of mean transit time 3 + 3 j s and blood volume
    1-5 mL/100 g (peaks of 10-60 HU for a 400 HU AIF). ``contrast`` (HU) sets the tiles apart
    from the field before the bolus; 0 leaves the first frame without any feature at all. The
    tiles are the same on every slice. ``motion`` (T, 6) moves the phantom rigidly about the
    volume centre (degrees, mm), frame t drawn through transform T_t (first frame -> frame t).
    """
    times = np.array([0.0, 4.0, 7.0, 9.0, 11.0, 13.0, 17.0, 24.0])
    fine = np.arange(0.0, 40.0, 0.1)
    s = np.clip(fine - 4.0, 0, None)
    aif = s**3 * np.exp(-s / 1.5)
    aif *= 400 / aif.max()
    fov, tile, gap = 160.0, 12.0, 8.0
    dx = fov / size
    affine = np.diag([dx, dx, 5.0, 1.0])
    affine[:3, 3] = [-(size - 1) * dx / 2, -(size - 1) * dx / 2, -(slices - 1) * 2.5]
    motion = np.zeros((times.size, 6)) if motion is None else motion
    jj, ii = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    pts = (np.c_[ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)] @ affine.T)[:, :3]
    edges = -fov / 2 + gap + np.arange(7) * (tile + gap)  # lower edge of each tile row/column
    curves = np.empty((7, 7, times.size))
    for i in range(7):
        for j in range(7):
            box = np.ones(round((3 + 3 * j) / 0.1)) * 0.1  # unit area over the transit time
            c = np.convolve(np.interp(fine - 0.5 * i, fine, aif, left=0), box)[:fine.size]
            cbv = 1.0 + 4.0 * (i + j) / 12
            curves[i, j] = np.interp(times, fine, c) * cbv / 100 / 0.733 * 1.04 / 3 * 6
    frames = []
    for t, p in enumerate(motion):
        tx = make_transform(p, np.zeros(3))
        m = np.asarray(tx.GetMatrix()).reshape(3, 3)
        x, y, _ = ((pts - p[3:]) @ np.linalg.inv(m).T).T  # T^-1 (y), centre at the origin
        inside_x = _sig((x[:, None] - edges) / 0.5) * _sig((edges + tile - x[:, None]) / 0.5)
        inside_y = _sig((y[:, None] - edges) / 0.5) * _sig((edges + tile - y[:, None]) / 0.5)
        level = contrast + curves[:, :, t]  # (7, 7): rows i along y, columns j along x
        plane = 30.0 + np.einsum("ni,ij,nj->n", inside_y, level, inside_x)
        frames.append(np.broadcast_to(plane.reshape(size, size), (slices, size, size)))
    hu = np.array(frames) + noise * rng.standard_normal((times.size, slices, size, size))
    return CTPSeries(hu=hu.astype(np.float32), times=times, affine=affine)


@pytest.mark.parametrize(("slices", "noise"), [(1, 15.0), (8, 10.0)])
def test_still_tiles_without_head_stay_put(slices, noise):
    """A still tile phantom (no skull, a featureless first frame, enhancing tiles) keeps every
    frame, and reports none as moved: before the check, the fit moved frames by 4-14 mm (and
    reporting fits short of the check's gain as "uncorrected" called 14 of 112 frames of such
    phantoms moved by 3-5 mm)."""
    series = tile_study(np.random.default_rng(11), slices=slices, noise=noise)
    # the phantom does enhance: the brightest tile gains well over the noise at its peak
    assert (series.hu.mean(1).max(0) - series.hu[0].mean(0)).max() > 40
    result = correct_motion(series, workers=2)
    # issue target 0.3 mm; every frame keeps the identity here (measured 0.0 mm)
    assert result.max_displacement_mm.max() < 0.1, (result.decision, result.fitted_parameters)
    assert result.decision[0] == "reference"
    assert set(result.decision[1:]) == {"identity"} and np.all(result.uncorrected_mm == 0)
    assert np.array_equal(result.series.hu, series.hu)  # an identity frame is left untouched


#: In-plane motion of a tile phantom: up to 4 degrees and 4 mm.
TILE_MOTION = np.zeros((8, 6))
TILE_MOTION[:, 2] = [0, 0, 1.0, 2.0, -2.0, 3.0, 4.0, -3.0]
TILE_MOTION[:, 3] = [0, 2.0, 0, -3.0, 4.0, 1.0, -2.0, 3.0]
TILE_MOTION[:, 4] = [0, -2.0, 3.0, 0, 2.0, -4.0, 1.0, 2.0]


def test_moved_tiles_are_corrected_whatever_the_thread_count():
    """A moving tile phantom (tiles 40 HU above the field before the bolus) is made better,
    never worse, and the same in 1 or 2 threads."""
    series = tile_study(np.random.default_rng(12), slices=1, size=96, noise=12.0,
                        contrast=40.0, motion=TILE_MOTION)
    one = correct_motion(series, workers=1)
    two = correct_motion(series, workers=2)
    # every frame has its own seeds and nothing is shared: identical results
    assert np.array_equal(one.parameters, two.parameters)
    assert np.array_equal(one.series.hu, two.series.hu)
    assert one.decision == two.decision
    points = all_points(series)
    before = np.array([tre(np.zeros((1, 6)), TILE_MOTION[t:t + 1], one.center_mm, points)
                       for t in range(1, 8)])
    after = np.array([tre(one.parameters[t:t + 1], TILE_MOTION[t:t + 1], one.center_mm, points)
                      for t in range(1, 8)])
    moved = np.array([d in ("in-plane", "rigid") for d in one.decision[1:]])
    # Measured: 4 of 7 frames corrected (2.8-3.5 mm -> 0.2-0.9 mm); the others are bolus frames
    # whose enhancement outweighs what the fit gains, and keep the identity (never worse; not
    # "uncorrected" either, which only a fit beyond the plausible range can be).
    assert moved.sum() >= 3, one.decision
    assert np.all(after[moved] < 0.5 * before[moved]), (before, after)
    assert np.array_equal(after[~moved], before[~moved])
    assert set(one.decision[1:]) <= {"identity", "in-plane", "rigid"}
    assert np.all(one.uncorrected_mm == 0)
    # each kept fit clearly beat the identity on the check metric
    assert np.all(one.check_in_plane[1:][moved]
                  < (1 - one.min_gain) * one.check_identity[1:][moved])


def test_implausible_fits_are_not_used():
    """A fit beyond the plausible shift is replaced by the identity, and recorded: the frame
    moved and was not corrected, by about the 2.8 mm it moved."""
    series = tile_study(np.random.default_rng(12), slices=1, size=96, noise=12.0,
                        contrast=40.0, motion=TILE_MOTION)
    result = correct_motion(series.replace(hu=series.hu[:2], times=series.times[:2]),
                            workers=1, max_shift_mm=1.0)
    assert np.linalg.norm(result.fitted_parameters[1, 3:]) > 2.0  # the fit found the 2.8 mm
    assert result.decision == ("reference", "uncorrected")
    assert np.all(result.parameters == 0) and np.isnan(result.check_in_plane[1])
    assert result.uncorrected_mm[1] == pytest.approx(2.8, abs=0.5)
    assert np.all(result.displacement_mm == 0)
    record = json.loads(json.dumps(result.record()))  # JSON-ready: None for NaN
    assert record["decision"] == ["reference", "uncorrected"]
    assert record["uncorrected_mm"][1] == pytest.approx(result.uncorrected_mm[1])
    assert record["check_in_plane"] == [None, None]
    assert record["fitted_parameters"][1] == pytest.approx(list(result.fitted_parameters[1]))


def all_points(series: CTPSeries) -> np.ndarray:
    """Patient mm of every third voxel of the grid."""
    zyx = np.argwhere(np.ones(series.shape[1:], dtype=bool))[::3]
    return (np.c_[zyx[:, ::-1], np.ones(len(zyx))] @ series.affine.T)[:, :3]

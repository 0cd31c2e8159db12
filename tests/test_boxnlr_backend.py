"""The box-model fits on a GPU give the NumPy results; device selection and errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ctperf.errors import ValidationError
from ctperf.perfusion import ArterialTable, box_model, fit_box_nlr, flow_scale

TIMES = np.arange(89) * 0.5
SCALE = flow_scale(1.04, 0.733)


def _aif(t: np.ndarray) -> np.ndarray:
    x = np.clip(t - 6.0, 0, None)
    y = x**3 * np.exp(-x / 1.5)
    return 400.0 * y / y.max()


def _tissue(rng: np.random.Generator, n: int, noise: float = 8.0) -> np.ndarray:
    """Box-model curves simulated on a 0.02 s grid, sampled every 0.5 s, plus noise."""
    fine = np.arange(0, TIMES[-1] + 0.01, 0.02)
    p = np.c_[rng.uniform(5, 70, n), rng.uniform(2, 12, n), rng.uniform(-1, 6, n)]
    c = box_model(p, ArterialTable(_aif(fine), fine), scale=SCALE)
    return c[np.rint(TIMES / 0.02).astype(int)] + noise * rng.standard_normal((TIMES.size, n))


def _params(fit) -> np.ndarray:
    return np.c_[fit.cbf, fit.mtt, fit.delay]


def _compare(ref, other, mode: str) -> None:
    a, b = _params(ref), _params(other)
    rel = np.abs(a - b) / (np.abs(a) + 1e-3)
    # Both backends run the same operations on float64 in the same order; only the matrix
    # products building the correlation tables (different BLAS) may round differently, by
    # ~1e-16 relative. Newton stops on thresholds, so such a difference can move its last
    # accepted step (seen: 7e-7 relative on 3 % of voxels); a simplex can take another branch
    # on a near-tie and stop elsewhere inside its 1e-4 x tolerance (seen: 1 voxel in 300).
    # Hence: most voxels identical to 1e-9, none further apart than the stopping tolerances
    # allow, and the same misfit.
    assert np.mean(rel.max(axis=1) <= 1e-9) >= (0.97 if mode == "nlr" else 0.9), mode
    assert rel.max() <= (1e-5 if mode == "nlr-fast" else 1e-3), (mode, rel.max())
    np.testing.assert_allclose(other.residual, ref.residual, rtol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nlr", "nlr-fast"])
def test_cuda_matches_numpy(mode, rng, monkeypatch):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from ctperf.perfusion import boxnlr

    used, real = [], boxnlr.ArrayOps

    def spy(device=None):
        used.append(device)
        return real(device)

    tissue = _tissue(rng, 2000)
    extra = {"restarts": 1} if mode == "nlr" else {}  # the optional restart path too
    ref = fit_box_nlr(tissue, _aif(TIMES), TIMES, method=mode, **extra)
    # A small chunk so that several chunks (and the restart of bound-hugging voxels) run.
    monkeypatch.setattr(boxnlr, "ArrayOps", spy)
    on_gpu = fit_box_nlr(tissue, _aif(TIMES), TIMES, method=mode, device="cuda", chunk=512,
                         **extra)
    assert used == ["cuda"]  # the torch code ran, not NumPy's
    _compare(ref, on_gpu, mode)
    assert isinstance(on_gpu.cbf, np.ndarray) and on_gpu.cbf.dtype == np.float64


def test_numpy_fit_does_not_import_torch():
    code = ("import sys, numpy as np; from ctperf.perfusion import fit_box_nlr; "
            "t = np.arange(20) * 0.5; a = np.exp(-(t - 4) ** 2); "
            "fit_box_nlr(np.outer(a, [1.0, 2.0]), 100 * a, t, device='cpu'); "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_auto_device_spares_a_cpu_only_torch_its_import(monkeypatch):
    """--device auto (the default) imported torch (2-3 s of a 45 s run) to learn that a CPU
    build sees no GPU; its version says so. Another build is still asked."""
    from importlib import metadata

    from ctperf.perfusion.backend import resolve_torch_device

    class _Cuda:  # a torch that would say it sees a GPU, were it asked
        @staticmethod
        def is_available():
            return True

    monkeypatch.setitem(sys.modules, "torch", type(sys)("torch"))
    sys.modules["torch"].cuda = _Cuda  # type: ignore[attr-defined]
    monkeypatch.setattr(metadata, "version", lambda name: "2.13.0+cpu")
    assert resolve_torch_device("auto") is None
    monkeypatch.setattr(metadata, "version", lambda name: "2.13.0")
    assert resolve_torch_device("auto") == "cuda"


def test_auto_device_runs_and_uneven_frames_fall_back_to_numpy(rng):
    pytest.importorskip("torch")
    tissue = _tissue(rng, 20)
    ref = fit_box_nlr(tissue, _aif(TIMES), TIMES, method="nlr-fast")
    auto = fit_box_nlr(tissue, _aif(TIMES), TIMES, method="nlr-fast", device="auto")
    _compare(ref, auto, "nlr-fast")
    times = np.r_[TIMES[:60], TIMES[59] + np.arange(1, 11) * 1.5]  # uneven: NumPy path
    sub = tissue[:70]
    uneven = fit_box_nlr(sub, _aif(times), times, method="nlr-fast", device="auto")
    np.testing.assert_array_equal(_params(uneven),
                                  _params(fit_box_nlr(sub, _aif(times), times, method="nlr-fast")))


def test_device_errors():
    tissue, aif = np.zeros((89, 2)), _aif(TIMES)
    torch = pytest.importorskip("torch")
    with pytest.raises(ValidationError, match="unknown torch device"):
        fit_box_nlr(tissue, aif, TIMES, device="warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(ValidationError, match="no CUDA"):
            fit_box_nlr(tissue, aif, TIMES, device="cuda")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_nelder_mead_finds_box_constrained_minima(backend, rng):
    from ctperf.perfusion.backend import ArrayOps
    from ctperf.perfusion.nelder_mead import nelder_mead

    if backend == "torch":
        pytest.importorskip("torch")
    ops = ArrayOps("cpu" if backend == "torch" else None)
    n = 200
    bounds = np.array([[-1.0, 1.0], [0.0, 5.0], [2.0, 3.0]])
    # Minima inside and outside the box: the answer is the target projected onto the box.
    target = np.c_[rng.uniform(-2, 2, n), rng.uniform(-1, 6, n), rng.uniform(1.5, 3.5, n)]
    weight = np.array([[1.0], [0.3], [3.0]])
    tgt, w = ops.asarray(target.T), ops.asarray(weight)

    def fun(x, rows):  # x (3, M): a weighted quadratic bowl per problem
        return (w * (x - tgt[:, rows]) ** 2).sum(axis=0)

    x0 = ops.asarray(np.tile([0.5, 2.0, 2.5], (n, 1)))
    for kw in ({}, {"steps": np.array([0.2, 0.5, 0.1]), "fatol": ops.full(n, 1e-10)}):
        got = ops.to_numpy(nelder_mead(fun, x0, bounds=bounds, max_iter=3000, xatol=1e-6,
                                       ops=ops, **kw))
        err = np.abs(got - np.clip(target, bounds[:, 0], bounds[:, 1])).max(axis=1)
        # Stopped when the simplex spans 1e-6 and its values differ by 1e-4 (1e-10): on a
        # bowl with curvature >= 0.6 the best vertex is then within ~2e-2 (2e-5) of the minimum.
        # A simplex can also stall, collapsed against a bound, a little short of it (the reason
        # fit_box_nlr can restart such simplices): a few problems may stop within 1e-3.
        tol = 2e-2 if not kw else 1e-4
        assert np.mean(err <= tol) >= 0.98, (kw, np.sort(err)[-5:])
        assert err.max() <= max(tol, 1e-3), (kw, err.max())
        assert np.all((got >= bounds[:, 0]) & (got <= bounds[:, 1]))

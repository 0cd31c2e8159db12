"""The U-Net's shapes, architecture, FLOP count and frame selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ctperf.errors import ValidationError
from ctperf.model import UNet, resample_frames, select_frames, subsample_indices, unet_flops


@pytest.mark.parametrize(("frames", "h", "w", "kernel"),
                         [(16, 32, 32, 2), (5, 48, 64, 2), (89, 16, 16, 2), (8, 37, 29, 2),
                          (8, 33, 33, 3), (3, 7, 9, 3)])
def test_output_shape_and_range(frames: int, h: int, w: int, kernel: int):
    torch.manual_seed(0)
    net = UNet(frames, width=4, kernel_size=kernel)
    with torch.no_grad():
        y = net(torch.randn(2, frames, h, w))
    assert y.shape == (2, 1, h, w)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_multi_output_and_depth():
    net = UNet(6, out_channels=3, width=4, depth=3)
    assert net(torch.randn(1, 6, 20, 20)).shape == (1, 3, 20, 20)


def test_default_architecture_is_the_papers():
    net = UNet(89)
    down_convs = [m for block in net.down for m in block if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in down_convs] == [64, 64, 128, 128, 256, 256, 512, 512,
                                                    1024, 1024]
    assert all(c.kernel_size == (2, 2) for c in down_convs)
    assert isinstance(net.pool, torch.nn.AvgPool2d)
    assert all(u.kernel_size == (2, 2) and u.stride == (2, 2) for u in net.upconv)
    assert net.head.kernel_size == (1, 1)


def test_padding_keeps_features_aligned():
    # a 2 x 2 convolution pads on one side: a one-pixel impulse must stay on the grid, so an
    # identity-like kernel maps the input to itself without a shift
    net = UNet(1, width=1, depth=1, kernel_size=2)
    conv = net.down[0][1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0
        conv.bias.zero_()
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 5] = 1.0
    pad, conv_layer = net.down[0][0], net.down[0][1]
    with torch.no_grad():
        assert torch.equal(conv_layer(pad(x)), x)


def _impulse_centroid_offset(depth: int, size: int, pos: tuple[int, int]) -> np.ndarray:
    """(dy, dx) of the response's centre of mass from a one-pixel impulse at ``pos``."""
    net = UNet(1, width=1, depth=depth, kernel_size=2)
    with torch.no_grad():
        for m in net.modules():  # positive constant weights, no bias: a linear, blurring net
            if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                m.weight.fill_(0.1)
                if m.bias is not None:
                    m.bias.zero_()
        x = torch.zeros(1, 1, size, size)
        x[0, 0, pos[0], pos[1]] = 1.0
        r = (net(x) - 0.5)[0, 0].double().numpy()  # sigmoid(0) = 0.5 is the zero response
    assert r.min() >= 0.0 and r.sum() > 0
    idx = np.arange(size)
    return np.array([(r.sum(1) * idx).sum(), (r.sum(0) * idx).sum()]) / r.sum() - np.array(pos)


@pytest.mark.parametrize(("depth", "size", "pos"),
                         [(1, 16, (8, 8)), (2, 17, (8, 9)), (3, 64, (32, 31)),
                          (5, 256, (128, 128)), (5, 255, (127, 129)), (5, 250, (125, 124))])
def test_two_by_two_blocks_have_a_centred_receptive_field(depth: int, size: int,
                                                          pos: tuple[int, int]):
    # the two convolutions of a block pad opposite sides, so their half-pixel shifts cancel;
    # padding one side in both shifted the response by 1 px per block (45 px at depth 5 here).
    # Average pooling puts an impulse at one corner of a 2 x 2 cell, so the coarse paths may
    # be off by up to half a pixel; with the image 8 times wider than the impulse's reach
    # the borders do not pull the centre (0.01 px leaves room for float32 sums)
    offset = _impulse_centroid_offset(depth, size, pos)
    assert np.all(np.abs(offset) <= 0.5), offset
    if depth <= 3:
        assert np.all(np.abs(offset) < 0.01), offset


def test_block_response_is_symmetric():
    # one block of two 2 x 2 convolutions with equal weights: the impulse response is the
    # 3 x 3 binomial kernel (1 2 1) x (1 2 1) centred on the impulse, exactly
    net = UNet(1, width=1, depth=1, kernel_size=2)
    block = net.down[0]
    with torch.no_grad():
        for m in block:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
        x = torch.zeros(1, 1, 9, 9)
        x[0, 0, 4, 4] = 1.0
        r = block(x)[0, 0].numpy()
    expect = np.zeros((9, 9))
    expect[3:6, 3:6] = np.outer([1, 2, 1], [1, 2, 1])
    np.testing.assert_array_equal(r, expect)


def test_baseline_frames_feed_anatomy_and_enhancement():
    torch.manual_seed(0)
    net = UNet(6, width=2, depth=2, baseline_frames=2, contrast_gain=4.0)
    seen = {}
    net.down[0].register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    x = torch.randn(3, 6, 16, 16)
    net(x)
    base = (x[:, 0] + x[:, 1]) / 2
    assert torch.allclose(seen["x"][:, 0], base)
    assert torch.allclose(seen["x"][:, 1:], (x[:, 1:] - base[:, None]) * 4.0)
    # a voxel-wise offset common to all frames reaches only the anatomy channel
    shifted = x + torch.randn(3, 1, 16, 16)
    net(shifted)
    assert torch.allclose(seen["x"][:, 1:], (x[:, 1:] - base[:, None]) * 4.0, atol=1e-5)


def test_enhancement_quantile_makes_the_input_independent_of_the_injection():
    torch.manual_seed(0)
    net = UNet(6, width=2, depth=2, baseline_frames=2, enhancement_quantile=1.0)
    seen = {}
    net.down[0].register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0].clone()))
    base = torch.randn(2, 1, 16, 16)
    enh = torch.rand(2, 6, 16, 16)
    enh[:, :2] = 0.0  # the baseline frames carry no contrast
    net(base + enh)
    first = seen["x"]
    # the slice's most enhancing pixel (mean over frames) reads 1 in the enhancement channels
    mean_enh = first[:, 1:].mean(dim=1).flatten(1)
    assert torch.allclose(mean_enh.max(dim=1).values, torch.ones(2), atol=1e-5)
    assert torch.allclose(first[:, 0], base[:, 0], atol=1e-5)  # the anatomy is untouched
    # twice the contrast (another injection, same perfusion): the same enhancement channels
    net(base + 2.0 * enh)
    assert torch.allclose(seen["x"][:, 1:], first[:, 1:], atol=1e-5)
    # a slice without enhancement is not blown up: the level has a floor
    net(base.expand(2, 6, 16, 16).contiguous())
    assert torch.all(seen["x"][:, 1:].abs() < 1e-3)


@pytest.mark.parametrize(("kwargs", "match"), [({"baseline_frames": 6}, "baseline_frames"),
                                               ({"baseline_frames": -1}, "baseline_frames"),
                                               ({"contrast_gain": 0.0}, "contrast_gain"),
                                               ({"enhancement_quantile": 0.5},
                                                "enhancement_quantile"),
                                               ({"baseline_frames": 2,
                                                 "enhancement_quantile": 1.5},
                                                "enhancement_quantile")])
def test_bad_baseline_settings_are_clear_errors(kwargs: dict, match: str):
    with pytest.raises(ValidationError, match=match):
        UNet(6, width=2, **kwargs)


def test_wrong_input_is_a_clear_error():
    with pytest.raises(ValidationError, match=r"expects input \(B, 8, H, W\)"):
        UNet(8, width=2)(torch.zeros(1, 7, 16, 16))
    with pytest.raises(ValidationError, match="norm must be"):
        UNet(8, norm="layer")


@pytest.mark.parametrize(("kernel", "size", "depth"), [(2, 32, 5), (3, 40, 4), (2, 21, 3)])
def test_flops_formula_matches_torch_counter(kernel: int, size: int, depth: int):
    net = UNet(7, width=4, depth=depth, kernel_size=kernel)
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 7, size, size))
    expected = unet_flops(in_frames=7, size=size, width=4, depth=depth, kernel_size=kernel)
    assert counter.get_total_flops() == expected  # both count 2 per multiply-add, exactly


def test_parameter_count_matches_layer_sum():
    net = UNet(10, width=8, depth=4, kernel_size=3)
    chans = [8, 16, 32, 64]
    conv = lambda ci, co, k: ci * co * k * k + co  # noqa: E731
    n = 0
    ci = 10
    for c in chans:
        n += conv(ci, c, 3) + conv(c, c, 3)
        ci = c
    for c in reversed(chans[:-1]):
        n += conv(2 * c, c, 2) + conv(2 * c, c, 3) + conv(c, c, 3)
    n += conv(8, 1, 1)
    assert net.n_parameters() == n


def test_subsample_indices_follow_the_authors_rule():
    idx = subsample_indices(89, 30)
    assert len(idx) == 30 and idx[0] == 0 and np.all(np.diff(idx) == 2)
    assert list(subsample_indices(10, 3)) == [0, 3, 6]
    assert list(subsample_indices(5, 5)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValidationError, match="only 4"):
        subsample_indices(4, 5)


def test_resample_frames_matches_np_interp(rng: np.random.Generator):
    times = np.cumsum(rng.uniform(0.5, 2.0, 12))
    hu = rng.normal(40, 10, (12, 2, 3, 4)).astype(np.float32)
    out = resample_frames(hu, times, n_frames=20, frame_interval=1.0)
    grid = times[0] + np.arange(20) * 1.0
    for z, y, x in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        expected = np.interp(grid, times, hu[:, z, y, x])  # holds the last value past the end
        # float32 interpolation of values ~40 HU
        np.testing.assert_allclose(out[:, z, y, x], expected, atol=1e-4)
    with pytest.raises(ValidationError, match="frame_interval"):
        select_frames(hu, times, n_frames=4, mode="resample")

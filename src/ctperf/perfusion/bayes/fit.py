"""``fit_bayes``: the Bayesian estimator's two stages over a study's voxels, and its result."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple, cast

import numpy as np
from scipy import sparse, special

from ctperf.errors import ValidationError
from ctperf.io.integrity import fit_times
from ctperf.parallel import map_chunks
from ctperf.perfusion.bayes.grid import DELAY_RANGE, ResidueGrid
from ctperf.perfusion.bayes.posterior import (
    _COLUMNS,
    _candidates,
    _moments,
    baseline_whitening,
    learn_shape_weights,
    noise_variance,
    shape_weights,
)
from ctperf.perfusion.bayes.spatial import (
    Neighbourhood,
    _block_noise,
    _blocks,
    _cells,
    interpolate_blocks,
    noise_fields,
    pool_amplitudes,
    pool_curves,
)
from ctperf.perfusion.curves import aif_area, finite_aif, flow_scale

log = logging.getLogger(__name__)

#: ``fit_bayes`` extends the delays by this many seconds at a time (up to the acquisition's end)
#: when at least :data:`LATE_BLOCKS` blocks, and :data:`LATE_FRACTION` of them, sit at the last;
#: curves fitted one by one (no voxel positions: regions of interest) when any one clearly
#: enhanced curve does (:data:`LATE_CURVE_SNR`).
DELAY_EXTENSION = 8.0
LATE_BLOCKS = 3
LATE_FRACTION = 0.002
#: A curve fitted without voxel positions extends the delays when its peak stands this many
#: SDs of its noise above its baseline.
LATE_CURVE_SNR = 5.0

#: ``fit_bayes`` leaves the vessels out of its neighbourhoods' averages only while they are at
#: most this fraction of the voxels: a mask that covers more (an AIF whose peak is too low to
#: tell vessels from tissue) would leave the prior to a few voxels.
MAX_VESSEL_FRACTION = 0.2

#: ``fit_bayes``'s prior probability that a block's tissue departs from its neighbourhood's (a
#: lesion narrower than the neighbourhood, a tissue border): the block's own posterior then joins
#: its voxels' prior, as far as its mean curve is better explained by it than by the
#: neighbourhood's posterior (:func:`_departures`). Where the curves tell the two apart poorly
#: the probability stays near this prior, so it is small: at 0.5 a lesion-free phantom at low
#: contrast read 2.6-6.3 mL hypoperfused for 0.2-1.2 mL (docs/bayes.md).
DEPARTURE_PRIOR = 0.05
#: The weight a departing block's own posterior takes in its in-plane neighbours' prior, times
#: its probability of departing (:func:`_mixtures`).
NEIGHBOUR_SHARE = 0.5

#: Below this ratio of the pre-bolus frames' second differences' variance to their first
#: differences' (3 for noise independent between frames, 2 for overlapping reconstructions, 1.1
#: for noise smoothed over time by a Gaussian of one frame), ``fit_bayes``'s blocks do not
#: depart from their neighbourhood (:func:`white_over_time`).
MIN_DIFFERENCE_RATIO = 1.8

#: Smallest noise SD a curve is given, as a fraction of the arterial curve's peak (a noise-free
#: curve's estimate is 0): tiny, and in the curves' own units (HU, concentration or any scale).
NOISE_FLOOR = 1e-6


@dataclass(frozen=True)
class BayesFit:
    """Posterior estimates per voxel, ndarrays of shape (N,), float32.

    ``cbf`` mL/100 g/min, ``cbv`` mL/100 g, ``mtt`` s, ``delay`` s, ``tmax`` s, ``ttp`` s
    (the time to peak of the fitted tissue curve, from the first frame),
    ``transit_cv`` the coefficient of variation of the transit times (0 box, 1 exponential),
    ``residual`` root-mean-square misfit of the most probable grid point, HU; ``noise`` the noise
    SD used, HU; ``*_sd`` the maps' root-mean-square errors under the posterior (its standard
    deviations where its means are the maps), in the units of the map. ``shape_weights``: the
    residue shapes' prior probabilities when they were learned from the study;
    ``delay_range``: the grid's first and last delay, s (wider than :data:`DELAY_RANGE` where
    the study's tissue arrived later); ``edge`` the posterior mass on the grid's first or last
    MTT or delay (a posterior piled against the grid's edge: the curve asks for more than the
    grid holds).
    """

    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    delay: np.ndarray
    tmax: np.ndarray
    ttp: np.ndarray
    transit_cv: np.ndarray
    residual: np.ndarray
    noise: np.ndarray
    cbf_sd: np.ndarray
    cbv_sd: np.ndarray
    mtt_sd: np.ndarray
    tmax_sd: np.ndarray
    edge: np.ndarray
    shape_weights: dict[str, float] | None = None
    delay_range: tuple[float, float] = DELAY_RANGE


class _Candidates(NamedTuple):
    """Blocks (m,) whose voxels weigh the same candidates: the prior's most probable grid
    points (m, k) and draws from it (m, d), each with its log prior mass."""
    blocks: np.ndarray
    top: np.ndarray
    top_lp: np.ndarray
    drawn: np.ndarray
    drawn_lp: np.ndarray


class _Search(NamedTuple):
    """Stage 1 on one grid (:func:`fit_bayes`): the grid, its prior, the chunking and each
    block's candidates (most probable points, then draws) with their log posterior."""
    grid: ResidueGrid
    keep: int
    log_prior: np.ndarray
    weights: dict[str, float] | None
    chunk: int
    top: np.ndarray
    top_lp: np.ndarray
    drawn: np.ndarray
    drawn_lp: np.ndarray


def fit_bayes(
    tissue: np.ndarray,
    aif: np.ndarray,
    times: np.ndarray,
    *,
    rho: float = 1.04,
    kh: float = 0.733,
    mask: np.ndarray | None = None,
    spacing: tuple[float, float, float] | None = None,
    spatial: bool = True,
    spatial_sigma_mm: float = 3.0,
    noise_sd: float | None = None,
    baseline_frames: int | None = None,
    mtt_median: float = 5.0,
    mtt_log_sd: float = 1.0,
    mtt_jeffreys: bool = True,
    dispersion_mean: float | None = None,
    learn_shapes: bool = False,
    pool_amplitude: bool = True,
    smooth_blocks: bool = True,
    guide: np.ndarray | None = None,
    guide_sigma: float | None = None,
    vessels: np.ndarray | None = None,
    candidates: int = 96,
    draws: int = 48,
    grid_options: dict[str, object] | None = None,
    chunk: int = 2048,
    workers: int = 2,
    departure_prior: float = DEPARTURE_PRIOR,
    progress: bool = False,
) -> BayesFit:
    """Posterior estimates and standard deviations of CBF, CBV, MTT, delay and Tmax per voxel.

    Parameters
    ----------
    tissue : ndarray, shape (T, N)
        Tissue enhancement in HU (baseline subtracted).
    aif : ndarray, shape (T,)
        Arterial enhancement in HU, partial-volume corrected.
    times : ndarray, shape (T,)
        Frame times in s, strictly increasing (any spacing).
    rho, kh : float
        Brain density (g/mL) and haematocrit ratio.
    mask : ndarray of bool, shape (Z, Y, X), optional
        Where the N voxels lie (``mask.sum() == N``, C order); the spatial prior needs it.
    spacing : (dz, dy, dx), optional
        Voxel size in mm (default 1 mm), for the neighbourhood's width.
    spatial : bool
        Use the neighbourhood's posterior as each voxel's prior (needs ``mask``).
    spatial_sigma_mm : float
        In-plane Gaussian SD of the neighbourhood, mm.
    noise_sd : float, optional
        Noise SD of one frame, HU; default estimated per voxel from second differences
        (averaged over the neighbourhood with the spatial prior).
    baseline_frames : int, optional
        The leading frames whose mean was subtracted from ``tissue`` as its baseline: that
        mean's error is common to every later frame, and the likelihood accounts for it
        (:func:`baseline_whitening`). None: the frames' noise is independent.
    mtt_median, mtt_log_sd : float
        Log-normal prior on MTT (median s, SD of log MTT).
    mtt_jeffreys : bool
        Weigh the log-normal by the Jeffreys density of log MTT given the shape, dispersion
        and delay (:meth:`ResidueGrid.log_prior`), so that MTTs the data cannot tell apart
        do not gather prior mass.
    dispersion_mean : float, optional
        Mean of an exponential prior on the transport kernel's mean time, s; default the
        density 1 / (tau + :data:`DISPERSION_SCALE`) (:meth:`ResidueGrid.log_prior`). A prior
        favouring little dispersion lowers CBF where there is none, and makes Tmax early where
        there is.
    learn_shapes : bool
        With the spatial prior, replace the uniform prior over residue shapes by the weights
        that the neighbourhoods' average curves give them (:func:`learn_shape_weights`). Off
        by default: it helps studies of one residue shape with some dispersion and hurts
        undispersed ones (docs/bayes.md), and it makes each study's prior its own.
    pool_amplitude : bool
        With the spatial prior, pool each voxel's amplitude (CBV, and CBF through it) with its
        neighbours' by empirical Bayes (:func:`pool_amplitudes`); MTT, delay and Tmax are
        unchanged.
    smooth_blocks : bool
        With the spatial prior, read the blocks' levels of MTT, delay and Tmax from a bilinear
        surface through the block means (:func:`interpolate_blocks`), so that the timing maps
        do not step at the blocks' borders, as far as the blocks' differences are the noise's
        (:func:`_block_noise`).
    guide : ndarray, shape (Z, Y, X), optional
        Image whose values tell tissues apart (the temporal mean of the study, HU): the
        amplitude pooling then averages only neighbours of similar guide value.
    guide_sigma : float, optional
        Range width of the guide, HU; default four times the guide's noise, taken as the
        frames' noise over the square root of their number (the temporal mean's), and at least
        1 HU (nearly noise-free studies need no pooling, and a narrower range only costs time).
    vessels : ndarray of bool, shape (N,), optional
        Voxels left out of the neighbourhoods' averages (curves and noise) that make the
        spatial prior: an artery's or a vein's curve, many times a tissue's, would give the
        tissue around it the vessel's timing. They are still fitted, with their
        neighbourhood's prior. Ignored, with a warning, when they are more than
        :data:`MAX_VESSEL_FRACTION` of the voxels.
    candidates : int
        Grid points kept per voxel after the prior (the most probable ones): the estimates
        are posterior means over them.
    draws : int
        Grid points drawn from the prior (the neighbourhood's posterior) per voxel: their
        posterior weights give the uncertainty maps.
    grid_options : dict, optional
        Keyword arguments of :class:`ResidueGrid`. Without ``delay_range`` the delays span
        :data:`DELAY_RANGE` and are extended by :data:`DELAY_EXTENSION` s at a time, up to the
        delay at which the tissue's bolus would peak at the last frame, while more than a few
        blocks (curves, without the spatial prior) hold most of their posterior within 0.5 s
        of the last delay (tissue behind an occlusion can arrive 15-20 s after the AIF's
        artery); a ``delay_range`` given is kept as it is.
    departure_prior : float
        With the spatial prior and blocks of more than one voxel, the prior probability, in
        [0, 1), that a block's tissue departs from its neighbourhood's: the prior of its voxels
        is then a mixture of the neighbourhood's posterior and the block's own (the posterior
        of its mean curve under the global prior, less each voxel's own share of it), weighted
        by the evidence of the block's mean curve for each, and its in-plane neighbours mix its
        own posterior in too (:func:`_departures`, :func:`_mixtures`). Without it (0) a lesion
        narrower than the neighbourhood, whose enhancement the healthy tissue around it
        outweighs, takes the healthy tissue's timing.
    chunk : int
        Curves per block of work.
    workers : int
        Threads.
    progress : bool
        Progress bars.

    Returns
    -------
    BayesFit
    """
    y_all = np.asarray(tissue)
    t = fit_times(times)
    if y_all.ndim != 2 or y_all.shape[0] != t.size:
        raise ValidationError(f"tissue must be (T, N) with T = {t.size}, got {y_all.shape}")
    aif_area(finite_aif(aif, t), t)
    if t.size < 4:
        raise ValidationError(f"the fit needs at least 4 frames, got {t.size}")
    if not 0.0 <= departure_prior < 1.0:
        raise ValidationError(f"departure_prior must lie in [0, 1), got {departure_prior}")
    n = y_all.shape[1]
    m = np.zeros((0, 0, 0), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    use_space = spatial and mask is not None
    if use_space and int(m.sum()) != n:
        raise ValidationError(f"mask holds {int(m.sum())} voxels, tissue {n}")
    if n == 0:  # nothing to fit: empty maps, as the box fit gives
        e = np.zeros(0, dtype=np.float32)
        return BayesFit(*(e,) * 14)
    whiten = None if baseline_frames is None else baseline_whitening(t.size, baseline_frames)
    n_draws = int(max(draws, 1))
    # a curve with NaN or Inf is fitted as zeros there and given no values, as the box and
    # SVD fits give none (it had read CBF 43 % low, silently, for a NaN on its peak)
    unfit = ~np.isfinite(y_all).all(axis=0)
    if unfit.any():
        log.warning("%d of %d tissue curves hold NaN or Inf: no values for them",
                    int(unfit.sum()), n)
    y_all = np.nan_to_num(y_all.astype(np.float32, copy=False), posinf=0.0, neginf=0.0)
    own_noise = noise_variance(y_all, max(1, workers))
    # the noise's texture in space, for the amplitudes' pooling: read from the curves as given
    fields = noise_fields(y_all, own_noise) if spatial and mask is not None and \
        pool_amplitude else None
    if noise_sd is not None:
        noise = np.full(n, float(noise_sd) ** 2)
    else:  # a noise-free curve is fitted as one: the floor only keeps the precision finite,
        # at a millionth of the arterial peak, whatever the curves' units
        peak = float(np.abs(np.asarray(aif, dtype=np.float64)).max())
        noise = np.maximum(own_noise, (NOISE_FLOOR * peak) ** 2 or 1e-30)
    # curves without positions (regions) that clear their noise: each late one alone extends
    # the delays below (None for a map: a few late blocks there may be noise); read from the
    # curves as given, before any whitening
    clear = None if use_space else y_all.max(axis=0) > LATE_CURVE_SNR * np.sqrt(noise)

    # Stage 1: the candidates and their prior. With the spatial prior, the posterior of the
    # neighbourhood's average curve, computed once per in-plane block about as wide as the
    # neighbourhood's SD (neighbouring voxels' averages barely differ); otherwise the global
    # prior's most probable points for the voxel itself.
    if use_space:
        sp = spacing or (1.0, 1.0, 1.0)
        sig = (spatial_sigma_mm / sp[1], spatial_sigma_mm / sp[2])
        w_pool = None
        if vessels is not None:
            if np.shape(vessels) != (n,):
                raise ValidationError(f"vessels must have shape ({n},), got {np.shape(vessels)}")
            share = float(np.mean(vessels))
            if share <= MAX_VESSEL_FRACTION:
                w_pool = (~np.asarray(vessels, dtype=bool)).astype(np.float32)
            else:
                log.warning("%.0f %% of the voxels are marked as vessels: kept in the spatial "
                            "prior's averages (a mask that large is not the vessels)",
                            100 * share)
        pooled, gain, cell = pool_curves(y_all, m, sig, weights=w_pool)
        # Averaging divides white noise's variance by the number of voxels averaged, but noise
        # correlated in space (a filtered study, a scanner's reconstruction kernel) much less:
        # the gain is measured, as the ratio of the voxels' to the averaged curves' noise.
        around = Neighbourhood(m, spatial_sigma_mm, sp)
        stack = np.stack([own_noise, noise_variance(pooled, max(1, workers))[cell], noise])
        local = around.mean(stack, w_pool)
        if w_pool is not None:  # a voxel with no tissue around it: every neighbour counts
            alone = around.mean(w_pool[None])[0] < 1e-3
            if alone.any():
                local[:, alone] = around.mean(stack)[:, alone]
        # (an averaged noise of 0: a cell with no tissue within reach, which gains nothing)
        ratio = np.divide(local[0], local[1], out=np.ones_like(local[0]), where=local[1] > 0)
        gain = np.clip(ratio, 1.0, gain)
        if noise_sd is None:  # the neighbourhood's noise level, steadier than one voxel's
            noise = local[2]
        block_size = max(1, round(min(sig)))
        block, n_blocks = _blocks(m, block_size)
        avg = sparse.csr_matrix((np.ones(n), (block, np.arange(n))), shape=(n_blocks, n))
        counts = np.asarray(avg.sum(axis=1)).ravel()
        avg = sparse.diags(1.0 / counts) @ avg
        to_cell = sparse.csr_matrix((np.ones(n), (np.arange(n), cell)),
                                    shape=(n, pooled.shape[1]))
        block_curves = np.asarray(((avg @ to_cell) @ pooled.T).T, dtype=np.float32)  # (T, B)
        block_precision = (avg @ (gain / noise))
        del pooled
        # the blocks' own mean curves, without the vessels as the neighbourhoods' (a vein in a
        # block had let it depart to the vein's timing), and their noise measured (a
        # filtered study's is more than the voxels' over their number); frame by frame: a
        # sparse product with the voxels' curves would copy them in double precision
        w_own = np.ones(n, dtype=np.float32) if w_pool is None else w_pool
        own_weight = np.bincount(block, weights=w_own, minlength=n_blocks)
        w_own = np.where((own_weight > 0)[block], w_own, 1.0)     # all vessels: all of it
        own_weight = np.bincount(block, weights=w_own, minlength=n_blocks)
        own_curves = (np.stack([np.bincount(block, weights=frame * w_own, minlength=n_blocks)
                                for frame in y_all]) / own_weight).astype(np.float32)
        # the mean's noise also from its voxels' spread about it, frame by frame: noise
        # correlated between frames (a temporal filter) hides from second differences, and a
        # block then departed for its noise's sake
        spread = sum(np.bincount(block, weights=w_own * (frame - mean[block]) ** 2,
                                 minlength=n_blocks)
                     for frame, mean in zip(y_all, own_curves, strict=True)) / t.size
        spread = np.where(own_weight > 1.5, spread / np.maximum(own_weight - 1.0, 1.0), 0.0)
        own_precision = 1.0 / np.maximum.reduce([noise_variance(own_curves, max(1, workers)),
                                                 (avg @ noise) / own_weight,
                                                 spread / own_weight])
    else:
        block = np.arange(n)
        n_blocks, block_size = n, 1
        block_curves, block_precision = y_all, 1.0 / noise
    if whiten is not None:  # noise estimates above, from the curves as given
        w32 = whiten.astype(np.float32)
        block_curves = w32 @ block_curves
        y_all = block_curves if not use_space else w32 @ y_all
        if use_space:
            own_curves = w32 @ own_curves

    options = dict(grid_options or {})
    given = cast("tuple[float, float]", options.pop("delay_range", DELAY_RANGE))
    delays = (float(given[0]), float(given[1]))
    adapt = grid_options is None or "delay_range" not in grid_options
    # the latest delay a study can show: its tissue's bolus peaking at the last frame
    latest = float(t[-1] - t[int(np.argmax(aif))])

    def search(delay_range: tuple[float, float]) -> _Search:
        """The grid with these delays, its prior (learned shapes) and stage 1 on it."""
        grid = ResidueGrid(aif, t, scale=flow_scale(rho, kh), whiten=whiten,
                           delay_range=delay_range, **options)  # type: ignore[arg-type]
        keep = int(min(max(candidates, 1), grid.size))
        log_prior = grid.log_prior(mtt_median, mtt_log_sd, dispersion_mean,
                                   jeffreys=mtt_jeffreys)
        weights = None
        if use_space and learn_shapes:
            w = learn_shape_weights(block_curves, np.asarray(block_precision, dtype=np.float64),
                                    grid, log_prior)
            log_prior = log_prior + np.repeat(np.log(w), grid.size // w.size).astype(np.float32)
            weights = shape_weights(grid, log_prior)
            log.info("residue shape weights: %s",
                     ", ".join(f"{k} {v:.2f}" for k, v in weights.items()))
        # Stage 1 holds per curve its coarse posterior (Kc values) and the responses of the
        # fine points around its seeds (15 per seed, 2 x keep / 2 seeds, T values each):
        # chunks of about 2^24 such values (64 MB) per thread.
        per_curve = grid.coarse.size + 15 * keep * t.size
        chunk1 = max(16, min(chunk, (1 << 24) // per_curve))

        def stage1(s: int, e: int) -> tuple[np.ndarray, ...]:
            return _candidates(block_curves[:, s:e], block_precision[s:e], grid, log_prior,
                               keep, n_draws)

        parts = map_chunks(stage1, n_blocks, chunk=chunk1, workers=max(1, workers),
                           progress=progress, desc="bayes prior",
                           unit="block" if use_space else "voxel")
        top, top_lp, drawn, drawn_lp = (np.concatenate([p[j] for p in parts]) for j in range(4))
        return _Search(grid, keep, log_prior, weights, chunk1, top, top_lp, drawn, drawn_lp)

    grid, keep, log_prior, weights, chunk1, top, top_lp, drawn, drawn_lp = search(delays)
    # Tissue whose bolus arrives later than the grid's delays reach is fitted at the last delay
    # with a longer MTT and a lower CBF: where more than a few blocks put most of their
    # posterior within half a second of the last delay, the delays are extended and the
    # search run again, up to the latest delay the acquisition can show.
    # Regions: one clear late curve is enough (a region 16 s late had read CBF 12 for 20 at
    # Tmax 28 +- 0.04 s for 20.5); curves within their noise do not count (they had set every
    # curve's grid to 28-37 s).
    enough = max(LATE_BLOCKS, LATE_FRACTION * n_blocks) if clear is None else 1
    while adapt and delays[1] < latest:
        near = grid.delay_32[top] >= delays[1] - 0.5
        w = np.exp(top_lp - top_lp.max(axis=1, keepdims=True))
        at_end = (w * near).sum(axis=1) > 0.5 * w.sum(axis=1)
        late = int((at_end if clear is None else at_end & clear).sum())
        if late < enough:
            break
        delays = (delays[0], min(delays[1] + DELAY_EXTENSION, latest))
        log.info("%d blocks at the grid's last delay: delays extended to %.1f s", late,
                 delays[1])
        grid, keep, log_prior, weights, chunk1, top, top_lp, drawn, drawn_lp = search(delays)
    if use_space:
        # the prior of a voxel's own posterior: the block's posterior, which the most probable
        # points carry as weights and the draws as their number
        drawn_lp = np.zeros_like(drawn_lp)
    else:
        # the candidates were chosen by the voxel's own posterior: the prior is the global
        # one, and the draws, made from the posterior, carry their mass as their number
        top_lp = log_prior[top]
        drawn_lp = log_prior[drawn] - drawn_lp
    # each block's own posterior joins its voxels' prior as far as its mean curve departs from
    # the neighbourhood's, and its neighbours' where it favours departing (blocks of one voxel:
    # a voxel's own curve would decide both whether it departs and where to)
    groups = [_Candidates(np.arange(n_blocks), top, top_lp, drawn, drawn_lp)]
    if use_space and departure_prior > 0.0 and block_size > 1 and \
            white_over_time(y_all, baseline_frames):
        departed, eps, own = _departures(own_curves, own_precision, counts, grid, log_prior,
                                         top, top_lp, max(1, keep // 3), max(1, n_draws // 2),
                                         chunk1, workers, departure_prior)
        log.info("%d of %d blocks depart from their neighbourhood", departed.size, n_blocks)
        if departed.size:
            groups = _mixtures(groups[0], departed, eps, own,
                               _block_neighbours(m, block_size, departed), NEIGHBOUR_SHARE)

    # Stage 2: each voxel's own curve weighs its block's candidates; the voxels of a block
    # share them, so their projections are one batched product per block.
    order = np.argsort(block, kind="stable")
    width = int(np.bincount(block, minlength=n_blocks).max()) if n_blocks else 1
    members = np.full((n_blocks, width), -1, dtype=np.int64)
    members[block[order], _ranks(block[order])] = order
    mom = np.empty((n, len(_COLUMNS)), dtype=np.float64)
    per_chunk = max(1, chunk // width)
    for j, group in enumerate(groups):
        # the most probable points in increasing Tmax, once per block: the Tmax map is their
        # weighted median (_moments)
        by_tmax = np.argsort(grid.tmax_32[group.top], axis=1, kind="stable")
        cand = np.concatenate([np.take_along_axis(group.top, by_tmax, axis=1), group.drawn],
                              axis=1)
        cand_lp = np.concatenate([np.take_along_axis(group.top_lp, by_tmax, axis=1),
                                  group.drawn_lp], axis=1)
        n_top = group.top.shape[1]

        def stage2(s: int, e: int, blocks: np.ndarray = group.blocks, cand: np.ndarray = cand,
                   cand_lp: np.ndarray = cand_lp, n_top: int = n_top) -> None:
            vox = members[blocks[s:e]]                          # (nb, P)
            valid = vox >= 0
            ys = y_all[:, np.where(valid, vox, 0)]              # (T, nb, P)
            ys = np.ascontiguousarray(np.moveaxis(ys, 0, -1))   # (nb, P, T)
            bc = grid.responses[cand[s:e]]                      # (nb, M, T)
            g = np.matmul(ys, np.swapaxes(bc, 1, 2))[valid]     # (n_valid, M)
            yy = np.einsum("npt,npt->np", ys, ys, dtype=np.float64)[valid]
            ids = vox[valid]
            mom[ids] = _moments(g, yy, noise[ids], cand[s:e], cand_lp[s:e],
                                np.nonzero(valid)[0], grid, n_top)

        map_chunks(stage2, group.blocks.size, chunk=per_chunk, workers=max(1, workers),
                   progress=progress, desc="bayes" if j == 0 else "bayes, by departing blocks",
                   unit="block")
    if use_space and block_size > 1 and smooth_blocks:
        # timing: the blocks' steps between neighbours interpolated away (log MTT, delay, Tmax)
        # (as far as the blocks' differences are the noise's)
        bn = _block_noise(block_curves, block_precision, (top, top_lp), m, block_size, grid,
                          log_prior, keep, chunk1, workers)[block]
        own_mtt, own_tmax = mom[:, 2].copy(), mom[:, 4].copy()
        mom[:, 2] = np.exp(interpolate_blocks(np.log(np.maximum(mom[:, 2], 1e-6)), m,
                                              block_size, bn[:, 0]))
        mom[:, 3] = interpolate_blocks(mom[:, 3], m, block_size, bn[:, 1])
        mom[:, 4] = interpolate_blocks(mom[:, 4], m, block_size, bn[:, 2])
        mom[:, 15] += mom[:, 4] - own_tmax  # the curve's peak moves with the timing
        mom[:, 0] = mom[:, 1] * 60.0 / np.maximum(mom[:, 2], 1e-6)
        # the SDs are root-mean-square errors of the estimates under the voxel's posterior:
        # an estimate moved by the interpolation is that much further from the posterior's
        # centre, E[(x - new)^2] = E[(x - own)^2] + (new - own)^2
        mom[:, 10] = np.hypot(mom[:, 10], mom[:, 2] - own_mtt)
        mom[:, 14] = np.hypot(mom[:, 14], mom[:, 2] / np.maximum(own_mtt, 1e-6) - 1.0)
        mom[:, 11] = np.hypot(mom[:, 11], mom[:, 4] - own_tmax)
    if use_space and pool_amplitude:
        if guide is not None and np.asarray(guide).shape != m.shape:
            raise ValidationError(f"guide must have the mask's shape {m.shape}, got "
                                  f"{np.asarray(guide).shape}")
        g_sigma = guide_sigma if guide_sigma is not None else \
            max(4.0 * math.sqrt(float(np.median(noise)) / t.size), 1.0)
        cbv_var = mom[:, 9] ** 2
        cbv, var, _ = pool_amplitudes(mom[:, 1], cbv_var, mom[:, 13],
                                      Neighbourhood(m, spatial_sigma_mm, sp, guide, g_sigma),
                                      fields=fields)
        # CBF = 60 CBV / MTT: the pooled CBV's error no longer offsets MTT's within the voxel
        # (a shorter MTT fits a higher CBF of about the same area), so CBF's relative variance
        # is the sum of CBV's and that of MTT's reciprocal (column inv_mtt_rel)
        to_cbf = 60.0 / np.maximum(mom[:, 2], 1e-6)
        rel = var / np.maximum(cbv * cbv, 1e-12) + mom[:, 14] ** 2
        mom[:, 0] = cbv * to_cbf
        mom[:, 1] = cbv
        mom[:, 8] = np.abs(mom[:, 0]) * np.sqrt(rel)
        mom[:, 9] = np.sqrt(np.maximum(var, 0.0))
    mom[unfit] = np.nan
    col = {name: mom[:, j].astype(np.float32) for j, name in enumerate(_COLUMNS)}
    return BayesFit(cbf=col["cbf"], cbv=col["cbv"], mtt=col["mtt"], delay=col["delay"],
                    tmax=col["tmax"], ttp=col["ttp"], transit_cv=col["cv"],
                    residual=np.sqrt(mom[:, 6] / t.size).astype(np.float32),
                    noise=np.sqrt(mom[:, 7]).astype(np.float32),
                    cbf_sd=col["cbf_sd"], cbv_sd=col["cbv_sd"], mtt_sd=col["mtt_sd"],
                    tmax_sd=col["tmax_sd"], edge=col["edge"], shape_weights=weights,
                    delay_range=(float(grid.delays[0]), float(grid.delays[-1])))


def _departures(own: np.ndarray, precision: np.ndarray, counts: np.ndarray, grid: ResidueGrid,
                log_prior: np.ndarray, top: np.ndarray, top_lp: np.ndarray, keep: int,
                draws: int, chunk: int, workers: int, prior: float
                ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """The blocks whose own mean curve departs from their neighbourhood's posterior.

    Each block's tissue either follows its neighbourhood (prior probability 1 - ``prior``) or
    departs from it, its parameters then drawn from the global prior ``log_prior``. The
    posterior probability of departing comes from the block's own mean curve ``own`` (T, B):
    its evidence under the neighbourhood's posterior (its most probable points ``top`` and
    their log posterior ``top_lp``, (B, k)) against that under the global prior, over the
    ``keep`` most probable points of its own posterior (the whole grid searched coarse to
    fine, as :func:`_candidates`, at the curves' measured ``precision`` (B,)); the amplitude
    profiled out in both. The likelihoods take the larger of that noise and the residual of
    the curve's best fit: noise correlated between frames (overlapping reconstructions, a
    temporal filter) hides from second differences, and a block then departed for its noise's
    sake.

    Returns the blocks (m,) whose curve favours departing (probability above ``prior``, the
    Bayes factor above 1), their probabilities (m,), and each one's own most probable points
    and ``draws`` draws from its posterior, each with its normalised log mass under the
    block's posterior without the voxel's own share of it: the prior of a voxel that weighs
    them with its own curve, one of the block's ``counts`` (B,), is the global prior times
    the block's likelihood to the power 1 - 1 / count (the draws importance-weighted to it).
    """
    n_b, n_t = own.shape[1], own.shape[0]
    prec = np.asarray(precision, dtype=np.float64)
    parts = map_chunks(lambda s, e: _candidates(own[:, s:e], prec[s:e], grid, log_prior, keep,
                                                draws),
                       n_b, chunk=chunk, workers=max(1, workers))
    o_top, o_lp, o_drawn, d_lp = (np.concatenate([p[j] for p in parts]) for j in range(4))
    log_odds = np.empty(n_b)

    def odds(s: int, e: int) -> None:
        y = np.ascontiguousarray(own[:, s:e].T)                               # (n, T)
        yy = np.einsum("nt,nt->n", y, y, dtype=np.float64)

        def explained(points: np.ndarray) -> np.ndarray:
            g = np.maximum(np.einsum("nt,nkt->nk", y, grid.responses[points]), 0.0)
            return g.astype(np.float64) ** 2 * grid.inv_norm2[points]

        follow, depart = explained(top[s:e]), explained(o_top[s:e])
        # (four parameters: amplitude, MTT, delay and the shape's)
        sse = yy - np.maximum(follow.max(axis=1), depart.max(axis=1))
        p = np.minimum(prec[s:e], (n_t - 4) / np.maximum(sse, 1e-30))[:, None]
        log_odds[s:e] = (special.logsumexp(log_prior[o_top[s:e]] + 0.5 * p * depart, axis=1)
                         - special.logsumexp(top_lp[s:e] + 0.5 * p * follow, axis=1))

    map_chunks(odds, n_b, chunk=chunk, workers=max(1, workers))
    log_odds += math.log(prior / (1.0 - prior)) - float(special.logsumexp(
        log_prior.astype(np.float64)))
    out = np.flatnonzero(log_odds > math.log(prior / (1.0 - prior)))
    own_share = (1.0 / np.asarray(counts, dtype=np.float64)[out])[:, None]

    def without_own(lp: np.ndarray, points: np.ndarray, drawn: bool) -> np.ndarray:
        # (a draw, made from the posterior, carries its mass as its number: it is weighted by
        # the ratio of the two)
        lp = lp[out].astype(np.float64)
        x = (0.0 if drawn else lp) - own_share * (lp - log_prior[points[out]])
        return (x - special.logsumexp(x, axis=1, keepdims=True)).astype(np.float32)

    return out, special.expit(log_odds[out]), (o_top[out], without_own(o_lp, o_top, False),
                                               o_drawn[out], without_own(d_lp, o_drawn, True))


def _ranks(keys: np.ndarray) -> np.ndarray:
    """Each element's position (0, 1, ...) among the equal ones of sorted ``keys`` (n,)."""
    start = np.r_[0, np.flatnonzero(np.diff(keys)) + 1] if keys.size else np.zeros(0, int)
    return np.arange(keys.size) - np.repeat(start, np.diff(np.r_[start, keys.size]))


def _block_neighbours(mask: np.ndarray, size: int, blocks: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The in-plane neighbours (up, down, left, right) of ``blocks`` (m,) among the blocks of
    ``mask`` (:func:`_blocks`): pairs (neighbour block, position in ``blocks``)."""
    cells, shape = _cells(mask, size)
    used = np.unique(cells)
    lookup = np.full(int(np.prod(shape)), -1, dtype=np.int64)
    lookup[used] = np.arange(used.size)
    z, y, x = np.unravel_index(used[blocks], shape)
    receivers, donors = [], []
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        yy, xx = y + dy, x + dx
        inside = (yy >= 0) & (yy < shape[1]) & (xx >= 0) & (xx < shape[2])
        nb = np.full(blocks.size, -1, dtype=np.int64)
        nb[inside] = lookup[np.ravel_multi_index((z[inside], yy[inside], xx[inside]), shape)]
        ok = nb >= 0
        receivers.append(nb[ok])
        donors.append(np.flatnonzero(ok))
    return np.concatenate(receivers), np.concatenate(donors)


def _mixtures(base: _Candidates, departed: np.ndarray, eps: np.ndarray,
              own: tuple[np.ndarray, ...], neighbours: tuple[np.ndarray, np.ndarray],
              share: float) -> list[_Candidates]:
    """Every block's candidates once the departing blocks' own posteriors are mixed in.

    A departing block ``departed`` (m,) of probability ``eps`` (m,) gives its voxels the
    mixture (1 - eps) x the neighbourhood's posterior (``base``, every block's) + eps x its
    own (``own``: most probable points and draws, (m, k) and (m, d), each with its log mass).
    Its in-plane ``neighbours`` (pairs of receiving block and position in ``departed``) mix
    its own posterior in too, with the weight ``share`` x the largest probability among their
    departing neighbours, shared among those in proportion to theirs: the voxels of a block
    that straddles a lesion's edge, whose mean curve is mostly the healthy side's, can take
    the lesion's timing where their own curves favour it. Returns two groups: the blocks that
    keep the neighbourhood's posterior alone, and the others.
    """
    recv, donor = neighbours
    blocks = np.union1d(departed, recv)
    n = blocks.size
    at = np.searchsorted(blocks, departed)
    r = np.searchsorted(blocks, recv)
    own_eps = np.zeros(n)
    own_eps[at] = eps
    near = np.zeros(n)                                       # largest departing neighbour's
    np.maximum.at(near, r, eps[donor])
    total = np.zeros(n)
    np.add.at(total, r, eps[donor])
    taken = share * near
    # slots: the block's own posterior, then one per departing neighbour
    slot = np.zeros(r.size, dtype=np.int64)
    order = np.lexsort((donor, r))
    slot[order] = 1 + _ranks(r[order])
    n_slot = int(slot.max()) + 1 if slot.size else 1
    o_top, o_lp, o_drawn, o_dlp = own
    top = np.zeros((n, n_slot, o_top.shape[1]), dtype=o_top.dtype)
    top_lp = np.full(top.shape, -np.inf, dtype=np.float32)
    drawn = np.zeros((n, n_slot, o_drawn.shape[1]), dtype=o_drawn.dtype)
    drawn_lp = np.full(drawn.shape, -np.inf, dtype=np.float32)
    mass = np.zeros((n, n_slot))
    for rows, where, j, w in ((at, np.arange(departed.size), np.zeros(departed.size, int),
                               eps * (1.0 - taken[at])),
                              (r, donor, slot, taken[r] * eps[donor] / np.maximum(total[r],
                                                                                  1e-300))):
        top[rows, j] = o_top[where]
        top_lp[rows, j] = o_lp[where]
        drawn[rows, j] = o_drawn[where]
        drawn_lp[rows, j] = o_dlp[where]
        mass[rows, j] = w
    with np.errstate(divide="ignore"):
        log_mass = np.log(mass).astype(np.float32)[..., None]
        log_stay = np.log((1.0 - own_eps) * (1.0 - taken)).astype(np.float32)[:, None]
    n_draws = base.drawn.shape[1]
    plain = np.setdiff1d(base.blocks, blocks)
    return [_Candidates(plain, base.top[plain], base.top_lp[plain], base.drawn[plain],
                        base.drawn_lp[plain]),
            _Candidates(blocks,
                        np.concatenate([base.top[blocks], top.reshape(n, -1)], axis=1),
                        np.concatenate([base.top_lp[blocks] + log_stay,
                                        (top_lp + log_mass).reshape(n, -1)], axis=1),
                        np.concatenate([base.drawn[blocks], drawn.reshape(n, -1)], axis=1),
                        np.concatenate([base.drawn_lp[blocks] + log_stay - math.log(n_draws),
                                        (drawn_lp + log_mass).reshape(n, -1)], axis=1))]


def white_over_time(curves: np.ndarray, baseline_frames: int | None, *,
                    sample: int = 4096) -> bool:
    """Whether the noise of ``curves`` (T, N) is independent enough between frames for the
    blocks' departures: the variance of the pre-bolus frames' second differences over that of
    their first differences (trimmed means over up to ``sample`` evenly spaced curves) at least
    :data:`MIN_DIFFERENCE_RATIO`. Noise smoothed over time (a temporal filter) reads too
    little from second differences, and healthy blocks then departed for its sake (a review's
    heads: 2.9-3.4 % of healthy tissue read Tmax > 6 s, 0.8-0.9 % without departures); such a
    study is fitted without them, with a warning. True where there are fewer than 8 pre-bolus
    frames (``baseline_frames``) to judge by."""
    if baseline_frames is None or baseline_frames < 8:
        return True
    take = np.linspace(0, curves.shape[1] - 1, min(sample, curves.shape[1])).astype(np.int64)
    base = np.asarray(curves[:baseline_frames, take], dtype=np.float64)

    def variance(d: np.ndarray) -> float:
        # means, not medians: HU stored as integers make squared differences whole numbers,
        # whose medians had read 1, 4 or 9 times for white noise; the top 2 % left out
        sq = (d * d).ravel()
        return float(np.mean(sq[sq <= np.percentile(sq, 98.0)]))

    first = variance(np.diff(base, axis=0))
    second = variance(np.diff(base, n=2, axis=0))
    if not first > 0 or second / first >= MIN_DIFFERENCE_RATIO:
        return True
    log.warning("the study's noise is correlated between frames (second over first differences "
                "%.2f, 3 for independent noise): the blocks do not depart from their "
                "neighbourhood (departure_prior ignored)", second / first)
    return False

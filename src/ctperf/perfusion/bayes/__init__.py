"""Bayesian perfusion estimation on a grid of residue functions, with per-voxel uncertainty.

The tissue curve of a voxel is modelled as

    C(t) = (rho / kH) * (CBF / 6000) * integral Ca(s - delay) R(t - s) ds + noise

with R from a family of residue shapes that spans the box (Bennink's model), gamma-distributed
transit times (Mouridsen et al., NeuroImage 33:570, 2006, doi:10.1016/j.neuroimage.2006.06.015;
shape 1 is the exponential residue) and the linear residue, seen through an exponential transport
kernel h of mean 0-3 s (the dispersion between the artery of the AIF and the tissue, Calamante
et al., Magn. Reson. Med. 44:466, 2000): the curve is C = CBF x Ca * (h * R). The posterior of
(CBF, MTT, delay, shape, dispersion) is evaluated on a grid of all but CBF; CBF, the one linear
parameter, is solved in closed form at every grid point (Gaussian noise, CBF >= 0, flat prior on
CBF), so the likelihood of every grid point for a whole block of voxels is one matrix product
with the grid's unit-flow responses.

Spatial prior (``spatial=True``, used when the voxels' positions are known): hierarchical
estimation in the spirit of Boutelier et al. (IEEE TMI 31:1381, 2012,
doi:10.1109/TMI.2012.2189890) and of the spatial priors compared by Kudo et al. (Radiology
267:201, 2013). Each voxel's prior over (shape, MTT, delay) is the posterior of the Gaussian
average of its in-plane neighbourhood's curves, which carries the neighbourhood's evidence at
its reduced noise; the voxel's own curve then weighs the neighbourhood's most probable grid
points, and its own amplitude gives CBV. Low-CNR voxels so take their timing from their
surroundings instead of fitting the noise, while well-measured voxels follow their own data.
Without positions the prior is a broad log-normal on MTT and uniform on delay and shape. The
log-normal is weighed by the Jeffreys density of log MTT given the shape, dispersion and delay
(:meth:`ResidueGrid.log_prior`): MTTs much shorter than the bolus give nearly the same curve,
and without the factor they gather prior mass that pulls MTT short and CBF high.

Amplitude pooling (``pool_amplitude=True``, with the spatial prior): each voxel's CBV, still the
amplitude of its own noisy curve, is then pooled with its neighbours' by empirical Bayes
(:func:`pool_amplitudes`), over a neighbourhood guided by the study's temporal mean image
(:class:`Neighbourhood`), so that tissues of different temporal mean are not pooled together.

Maps: CBV and MTT are posterior means over the prior's most probable grid points; CBF = 60 CBV /
MTT keeps the central identity and avoids the upward bias that the posterior mean of CBV / MTT
has when MTT is uncertain. Uncertainty maps are the root-mean-square errors of the maps under
the whole posterior, from grid points drawn from the prior (systematic resampling) and weighted
by the voxel's likelihood, plus the variance within a grid cell. Curves whose baseline mean was
subtracted are whitened first (:func:`baseline_whitening`): that mean's error is common to every
later frame. Tmax follows the project's convention exactly: at every grid point it is the delay
plus the first time the dispersed residue h * R peaks; the map is its posterior median, which
noise pulls less towards the prior's bulk than the mean (shape, dispersion and MTT move Tmax
in steps, and its posterior is often skewed).
"""

from ctperf.perfusion.bayes.fit import BayesFit, fit_bayes
from ctperf.perfusion.bayes.grid import DISPERSIONS, RESIDUES, ResidueGrid, residue, transit_cv
from ctperf.perfusion.bayes.posterior import baseline_whitening, learn_shape_weights

__all__ = ["DISPERSIONS", "RESIDUES", "BayesFit", "ResidueGrid", "baseline_whitening", "fit_bayes",
           "learn_shape_weights", "residue", "transit_cv"]

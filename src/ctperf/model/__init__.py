"""The U-Net of Gava et al. 2023 (doi:10.3389/fninf.2023.852105): network, slice cache, training,
patient-level cross-validation and inference. The only ctperf package that imports torch."""

from ctperf.errors import DependencyError

try:
    import torch  # noqa: F401
except ImportError as _exc:  # an optional dependency: one line for the CLI, not a traceback
    raise DependencyError(f"the U-Net needs PyTorch ({_exc}); on a machine without a GPU "
                          "install its CPU build first (pip install torch --index-url "
                          "https://download.pytorch.org/whl/cpu, else pip takes a CUDA build "
                          "of several GB), then pip install 'ctperf[model]'") from None

from ctperf.model.checkpoint import (
    CHECKPOINT_VERSION,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from ctperf.model.crossval import cross_validate, format_table, make_folds
from ctperf.model.data import (
    SliceCache,
    build_slice_cache,
    input_arrival_s,
    iter_cohort,
    open_slice_cache,
)
from ctperf.model.normalise import (
    DEFAULT_HU_WINDOW,
    TARGET_MAPS,
    TARGET_WINDOWS,
    from_unit,
    normalise_input,
    to_unit,
)
from ctperf.model.predict import predict_maps
from ctperf.model.train import (
    PRESETS,
    TrainConfig,
    TrainResult,
    evaluate_mse,
    masked_mse,
    preset,
    resolve_device,
    train,
)
from ctperf.model.unet import (
    UNet,
    resample_frames,
    select_frames,
    subsample_indices,
    unet_flops,
)

__all__ = [
    "CHECKPOINT_VERSION",
    "DEFAULT_HU_WINDOW",
    "PRESETS",
    "TARGET_MAPS",
    "TARGET_WINDOWS",
    "SliceCache",
    "TrainConfig",
    "TrainResult",
    "UNet",
    "build_model",
    "build_slice_cache",
    "cross_validate",
    "evaluate_mse",
    "format_table",
    "from_unit",
    "input_arrival_s",
    "iter_cohort",
    "load_checkpoint",
    "make_folds",
    "masked_mse",
    "normalise_input",
    "open_slice_cache",
    "predict_maps",
    "preset",
    "resample_frames",
    "resolve_device",
    "save_checkpoint",
    "select_frames",
    "subsample_indices",
    "to_unit",
    "train",
    "unet_flops",
]

"""optaxclip: gradient clipping for JAX and Optax.

Value, per-tensor, per-unit and global-norm clipping, adaptive clipping, and a
step guard, each an ``optax.GradientTransformation`` that records what it did.
"""

from optaxclip._agc import AdaptiveGradClipState, adaptive_grad_clip
from optaxclip._checks import (
    CheckFiniteState,
    NonFiniteGradientError,
    check_finite,
    raise_if_nonfinite,
)
from optaxclip._clipping import (
    ClipByGlobalNormState,
    ClipByNormState,
    ClipByValueState,
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
)
from optaxclip._common import Threshold
from optaxclip._dp import DPState, QuantileNorm, dp_aggregate, dp_noise, quantile_norm
from optaxclip._norms import Axis, AxisName, Ord, global_norm
from optaxclip._per_example import PerExampleInfo, clipped_grad, per_example_clip
from optaxclip._quantile import ClipByQuantileState, clip_by_quantile
from optaxclip._skip import SkipStepState, SkipStepStats, skip_step
from optaxclip._stats import clip_stats, register_state
from optaxclip._zclip import ZClipState, zclip

register_state(ClipByGlobalNormState, "clip_by_global_norm")
register_state(ClipByNormState, "clip_by_norm")
register_state(ClipByValueState, "clip_by_value")
register_state(AdaptiveGradClipState, "adaptive_grad_clip")
register_state(ClipByQuantileState, "clip_by_quantile")
register_state(ZClipState, "zclip")
register_state(SkipStepState, "skip_step")
register_state(CheckFiniteState, "check_finite")
register_state(DPState, "dp")

from optaxclip._adagc import AdaGCState, adagc  # noqa: E402

register_state(AdaGCState, "adagc")

from optaxclip._spikes import (  # noqa: E402
    ClipSpikesState,
    SpikeClippedState,
    SpikeStats,
    clip_spikes,
)

register_state(SpikeStats, "clip_spikes")

__version__ = "0.1.0"

__all__ = [
    "AdaGCState",
    "adagc",
    "ClipSpikesState",
    "SpikeClippedState",
    "SpikeStats",
    "clip_spikes",
    "AdaptiveGradClipState",
    "Axis",
    "AxisName",
    "CheckFiniteState",
    "ClipByGlobalNormState",
    "ClipByNormState",
    "ClipByQuantileState",
    "ClipByValueState",
    "DPState",
    "NonFiniteGradientError",
    "Ord",
    "PerExampleInfo",
    "QuantileNorm",
    "SkipStepState",
    "SkipStepStats",
    "Threshold",
    "ZClipState",
    "adaptive_grad_clip",
    "check_finite",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_quantile",
    "clip_by_value",
    "clip_stats",
    "clipped_grad",
    "dp_aggregate",
    "dp_noise",
    "global_norm",
    "per_example_clip",
    "quantile_norm",
    "register_state",
    "raise_if_nonfinite",
    "skip_step",
    "zclip",
]

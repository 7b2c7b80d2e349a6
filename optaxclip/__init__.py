"""optaxclip: gradient clipping for JAX and Optax.

Value, per-tensor, per-unit and global-norm clipping, adaptive clipping, and a
step guard, each an ``optax.GradientTransformation`` that records what it did.

The package, one concept per module (each imports the others' public names
only; the arrows of imports point down this list, never up):

Transforms, each module with its state types:
  _clipping      clip_by_value, clip_by_norm, clip_by_global_norm
  _agc           adaptive_grad_clip (AGC)
  _quantile      clip_by_quantile (AutoClip)
  _zclip         zclip
  _adagc         adagc
  _spikes        clip_spikes (SPAM's rule)
  _update_clip   clip_update_rms (StableAdamW), clip_update_by_history
  _skip          skip_step, the step guard
  _checks        check_finite, raise_if_nonfinite
  _per_example   per_example_clip, clipped_grad (vmap; ghost via _ghost)
  _ghost         ghost norms of Flax NNX layers
  _dp            dp_aggregate, dp_noise, quantile_norm
  _qk_clip       qk_clip (Kimi K2's QK-Clip), max_logit_attention, gather_max_logits
Shared, below them:
  _transform     the Optax transformation a factory returns, fast without jit
  _example_clip  per-example weights, the weighted sum, PerExampleInfo
  _apply      the scale rule applied leaf by leaf, per group of leaves
  _norms         norm kernels, the one overflow-safe kernel, collectives
  _thresholds    hyper-parameters at run time: schedules, prefix trees
  _stats         the counters every state keeps; clip_stats, register_state
  _tree          live leaves, rebuilding, paths, accumulation dtypes
  _validate      every argument check
  _numerics      powers of two, Norm, Scale, the scale rule min(1, t/n)
"""

from optaxclip._adagc import AdaGCState, adagc
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
from optaxclip._dp import DPState, QuantileNorm, dp_aggregate, dp_noise, quantile_norm
from optaxclip._example_clip import PerExampleInfo
from optaxclip._norms import AxisName, Ord, global_norm
from optaxclip._per_example import clipped_grad, per_example_clip
from optaxclip._qk_clip import (
    QKClipState,
    QKLayout,
    gather_max_logits,
    max_logit_attention,
    qk_clip,
)
from optaxclip._quantile import ClipByQuantileState, clip_by_quantile
from optaxclip._skip import SkipStepState, SkipStepStats, SpikeWindow, skip_step
from optaxclip._spikes import ClipSpikesState, SpikeClippedState, SpikeStats, clip_spikes
from optaxclip._stats import clip_stats, register_state
from optaxclip._thresholds import Threshold
from optaxclip._tree import Axis
from optaxclip._update_clip import (
    ClipUpdateByHistoryState,
    ClipUpdateRMSState,
    clip_update_by_history,
    clip_update_rms,
)
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
register_state(AdaGCState, "adagc")
register_state(SpikeStats, "clip_spikes")
register_state(QKClipState, "qk_clip")
register_state(ClipUpdateRMSState, "clip_update_rms")
register_state(ClipUpdateByHistoryState, "clip_update_by_history")

__version__ = "0.1.0"

__all__ = [
    "AdaGCState",
    "adagc",
    "ClipSpikesState",
    "SpikeClippedState",
    "SpikeStats",
    "clip_spikes",
    "ClipUpdateByHistoryState",
    "ClipUpdateRMSState",
    "clip_update_by_history",
    "clip_update_rms",
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
    "QKClipState",
    "QKLayout",
    "QuantileNorm",
    "SkipStepState",
    "SkipStepStats",
    "SpikeWindow",
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
    "gather_max_logits",
    "global_norm",
    "max_logit_attention",
    "per_example_clip",
    "qk_clip",
    "quantile_norm",
    "register_state",
    "raise_if_nonfinite",
    "skip_step",
    "zclip",
]

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
  _spectral      clip_by_spectral_norm: singular values capped (SPECTRA)
  _loss_scale    dynamic_loss_scale (fp16 loss scaling), loss_scale
  _skip          skip_step, the step guard
  _checks        check_finite, raise_if_nonfinite
  _per_example   per_example_clip, clipped_grad (vmap; ghost via _ghost)
  _ghost         ghost norms read from the loss's jaxpr, any framework
  _dp            dp_aggregate, dp_noise, quantile_norm
  _qk_clip       qk_clip (Kimi K2's QK-Clip), max_logit_attention, gather_max_logits
  _layers        layer_axes: the layer_axis tree of a model (linen, NNX, Equinox)
  _checkpoint    adopt_state: an old optimizer's state carried into a new chain
Shared, below them:
  _transform     the Optax transformation a factory returns, fast without jit
  _example_clip  per-example weights, the weighted sum, PerExampleInfo
  _apply      the scale rule applied leaf by leaf, per group of leaves
  _norms         norm kernels, the one overflow-safe kernel, collectives,
                 NormParts (exact, mergeable partial norms)
  _thresholds    hyper-parameters at run time: schedules, prefix trees
  _stats         ClipStats, the record every state holds; clip_stats
  _tree          live leaves, rebuilding, paths, accumulation dtypes
  _validate      every argument check
  _numerics      powers of two, Norm, Scale, the scale rule min(1, t/n)
"""

from optaxclip._adagc import AdaGCState, adagc
from optaxclip._agc import AdaptiveGradClipState, adaptive_grad_clip
from optaxclip._checkpoint import adopt_state
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
from optaxclip._example_clip import ExampleClip, PerExampleInfo
from optaxclip._layers import layer_axes
from optaxclip._loss_scale import DynamicLossScaleState, dynamic_loss_scale, loss_scale
from optaxclip._norms import AxisName, NormParts, Ord, global_norm, norm_parts
from optaxclip._per_example import clipped_grad, per_example_clip
from optaxclip._qk_clip import (
    QKClipState,
    QKLayout,
    gather_max_logits,
    max_logit_attention,
    qk_clip,
)
from optaxclip._quantile import ClipByQuantileState, clip_by_quantile
from optaxclip._skip import SkipStepState, SpikeEMA, SpikeWindow, skip_step
from optaxclip._spectral import ClipBySpectralNormState, clip_by_spectral_norm
from optaxclip._spikes import ClipSpikesState, SpikeClippedState, clip_spikes, spike_clipped
from optaxclip._stats import ClipStats, clip_stats
from optaxclip._thresholds import Threshold
from optaxclip._tree import Axis
from optaxclip._update_clip import (
    ClipUpdateByHistoryState,
    ClipUpdateRMSState,
    clip_update_by_history,
    clip_update_rms,
)
from optaxclip._zclip import ZClipState, ZScore, zclip

__version__ = "0.1.0"

__all__ = [
    "AdaGCState",
    "adagc",
    "ClipSpikesState",
    "SpikeClippedState",
    "clip_spikes",
    "spike_clipped",
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
    "ClipBySpectralNormState",
    "ClipByValueState",
    "ClipStats",
    "DPState",
    "NonFiniteGradientError",
    "NormParts",
    "Ord",
    "ExampleClip",
    "PerExampleInfo",
    "QKClipState",
    "QKLayout",
    "QuantileNorm",
    "SkipStepState",
    "SpikeEMA",
    "SpikeWindow",
    "Threshold",
    "ZClipState",
    "ZScore",
    "adaptive_grad_clip",
    "adopt_state",
    "check_finite",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_quantile",
    "clip_by_spectral_norm",
    "clip_by_value",
    "clip_stats",
    "clipped_grad",
    "dp_aggregate",
    "dp_noise",
    "gather_max_logits",
    "global_norm",
    "max_logit_attention",
    "norm_parts",
    "layer_axes",
    "per_example_clip",
    "qk_clip",
    "quantile_norm",
    "raise_if_nonfinite",
    "skip_step",
    "DynamicLossScaleState",
    "dynamic_loss_scale",
    "loss_scale",
    "zclip",
]

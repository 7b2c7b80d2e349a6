"""optaxclip: gradient clipping for JAX and Optax.

Value, per-tensor, per-unit and global-norm clipping, adaptive clipping, and a
step guard, each an ``optax.GradientTransformation`` that records what it did.
"""

from optaxclip._checks import CheckFiniteState, NonFiniteGradientError, check_finite
from optaxclip._clipping import (
    ClipByGlobalNormState,
    ClipByNormState,
    ClipByValueState,
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
)
from optaxclip._norms import global_norm
from optaxclip._stats import clip_stats, register_state

register_state(ClipByGlobalNormState, "clip_by_global_norm")
register_state(ClipByNormState, "clip_by_norm")
register_state(ClipByValueState, "clip_by_value")

__version__ = "0.1.0"

__all__ = [
    "CheckFiniteState",
    "ClipByGlobalNormState",
    "ClipByNormState",
    "ClipByValueState",
    "NonFiniteGradientError",
    "check_finite",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "clip_stats",
    "global_norm",
]

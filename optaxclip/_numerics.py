"""Exact floating-point numerics: powers of two, norms as pairs, the scale rule.

Everything here is elementwise and shape-agnostic; the norm kernels
(:mod:`optaxclip._norms`) and every clipper build on it.

- :func:`exponent` and :func:`pow2`: the one power-of-two helper, read from
  and written to the exponent bits (``jnp.frexp`` compiles into a large graph,
  slow when repeated per layer).
- :class:`Norm`: a norm as the product ``power * scaled``, exact beyond
  overflow.
- :func:`clip_factors`: ``min(1, t / n)``, the one scale rule of every
  clipper, with its edge cases; :class:`Scale` carries it as two normal
  factors; :func:`scale_leaf` applies it.
- :func:`widen`: float8 arrays as float32 (JAX promotes no float8 dtype
  implicitly), before they meet a float32 factor.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def exponent(m: jax.Array) -> jax.Array:
  """``e`` with ``m * 2**-e`` in ``[0.5, 1)``: ``2**e`` is the power of two
  just above ``m``.

  ``0`` for a zero or non-finite ``m``; clamped so that ``2**e`` and
  ``2**-e`` are normal numbers of ``m``'s dtype (a subnormal ``m`` gets the
  lowest such exponent). Read from the exponent bits, int32.
  """
  info = jnp.finfo(m.dtype)
  m = jax.lax.stop_gradient(m)
  bits = jax.lax.bitcast_convert_type(m, _int_like(m.dtype))
  e = ((bits >> info.nmant) & ((1 << info.nexp) - 1)) - (info.maxexp - 2)
  usable = (m > 0) & jnp.isfinite(m)
  return jnp.clip(jnp.where(usable, e, 0), info.minexp + 1,
                  info.maxexp - 2).astype(jnp.int32)


def pow2(e: jax.Array, dtype: Any) -> jax.Array:
  """``2**e`` in ``dtype``, exactly, for integer ``e`` in its normal range."""
  info = jnp.finfo(dtype)
  bits = (jnp.asarray(e).astype(_int_like(dtype)) + (info.maxexp - 1)
          ) << info.nmant
  return jax.lax.bitcast_convert_type(bits, dtype)


def _int_like(dtype: Any) -> Any:
  return np.dtype(f"int{np.dtype(dtype).itemsize * 8}")


class Norm(NamedTuple):
  """A norm as the product ``power * scaled``, exact even where it overflows.

  ``power`` is ``1`` or the power of two an overflow-safe kernel took out of
  the values; ``scaled`` is the norm of the values so scaled.
  """

  power: jax.Array
  scaled: jax.Array

  def value(self) -> jax.Array:
    """The norm as one number (``inf`` where the product overflows)."""
    return self.power * self.scaled


class Scale(NamedTuple):
  """A clip factor as two normal floats: ``g * scale`` is ``(g * a) * b``.

  ``a`` is 1 or ``2**-126``; splitting keeps the product exact where the
  factor itself is below the smallest normal number (a norm more than ~1e38
  times the threshold), which a CPU or GPU would flush to zero. ``factor``
  is the same number as one float, to record: it may underflow to 0 where
  the pair does not. (``a * b`` is never formed: XLA would reuse that
  product in place of the two multiplies.)
  """

  a: jax.Array
  b: jax.Array
  factor: jax.Array

  def value(self) -> jax.Array:
    """The factor as one number (it may underflow to 0; the pair does not)."""
    return self.factor


def clip_factors(norm: Norm | jax.Array, threshold: jax.Array) -> Scale:
  """``min(1, threshold / norm)``: the one scale rule of every clipper.

  Edge cases (``n`` the norm, ``t`` the threshold):

  ======================  ==========================================
  ``n <= t``              1, exactly: the update is returned bit for bit
  ``n = 0``               1 (``t = 0`` included)
  ``t = inf``             1 (``n = inf`` included)
  ``t = 0 < n``           0
  ``t`` negative or NaN   acts as ``t = 0``
  ``n = inf``, finite t   0 (an infinite entry becomes NaN, others 0)
  ``n`` NaN               NaN: the update is NaN, as in optax
  ``t / n`` subnormal     exact: applied as two normal factors
  ======================  ==========================================

  The derivative with respect to the update is finite everywhere, at a
  zero norm and at ``n = t`` included.

  Args:
    norm: a :class:`Norm` (exact beyond overflow) or an array of norms.
    threshold: the threshold(s), broadcastable against ``norm``.

  Returns:
    The factor as a :class:`Scale` pair, in the norm's dtype.
  """
  if not isinstance(norm, Norm):
    norm = Norm(jnp.ones_like(norm), norm)
  hi, lo = norm  # The power of two, and the norm of the scaled values.
  dtype = lo.dtype
  t = jnp.asarray(threshold).astype(dtype)
  t = jnp.where(t >= 0, t, jnp.zeros((), dtype))
  n = hi * lo  # May overflow to inf where hi * lo is beyond the dtype.
  over = n > t  # False for a NaN norm.
  # t / n as (t / hi) / lo: exact where hi * lo overflows (hi is 1 or a
  # power of two). Where that quotient is below 2**-100 (or flushed to 0) it
  # is applied as 2**-126 * (t * 2**126 / n), two normal factors, with the
  # 2**126 taken so that nothing overflows. A few scalar operations only:
  # XLA copies them into every kernel that applies the factor.
  # No chained divisions: XLA rewrites (x / hi) / lo as x / (hi * lo), which
  # overflows. 1 / hi is exact (hi is 1 or a power of two).
  one = jnp.ones((), dtype)
  inv_hi = 1 / jnp.where(over, hi, one)
  lo = jnp.where(over & (lo > 0), lo, one)
  q = (t * inv_hi) / lo
  split = q < 2.0**-100
  up = jnp.asarray(2.0**126, dtype)
  ts = jnp.where(t > 1, (t * inv_hi) * up, (t * up) * inv_hi)
  b = jnp.where(over, jnp.where(split, ts / lo, q), one)
  a = jnp.where(over & split, jnp.asarray(2.0**-126, dtype), one)
  nan = jnp.isnan(n)
  return Scale(a, jnp.where(nan, jnp.nan, b),
               jnp.where(nan, jnp.nan, jnp.where(over, q, one)))


def clip_scale(norm: Norm | jax.Array, threshold: jax.Array) -> jax.Array:
  """:func:`clip_factors` as one number, to record or to compare."""
  return clip_factors(norm, threshold).value()


def scale_leaf(g: jax.Array, s: Scale | jax.Array) -> jax.Array:
  """``g * s`` computed in the wider dtype and cast back to ``g``'s.

  A :class:`Scale` pair is applied as two multiplies, which XLA fuses into
  the same elementwise kernel.
  """
  w = widen(g)
  if isinstance(s, Scale):
    return ((w * s.a) * s.b).astype(g.dtype)
  return (w * s).astype(g.dtype)


def widen(x: jax.Array) -> jax.Array:
  """``x`` as float32 if it is a float8 array, else ``x`` unchanged.

  JAX promotes no float8 dtype implicitly (``float8 * float32`` raises
  ``TypePromotionError``): :func:`scale_leaf` and the overflow-safe norm
  kernel widen a leaf here before multiplying it by a float32 factor, so
  float8 leaves are scaled in float32 and rounded once, like float16 ones.
  """
  dtype = np.dtype(x.dtype)
  if dtype.itemsize == 1 and jnp.issubdtype(dtype, jnp.floating):
    return x.astype(jnp.float32)
  return x

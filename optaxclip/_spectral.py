"""Spectral clipping: each matrix's singular values capped at a threshold.

The clip is a matrix function of the Gram matrix, computed with
Newton-Schulz iterations (matrix products only, no SVD), so that it runs
on any accelerator, under ``jit``, ``vmap`` and sharding. For a matrix
``M`` (rows <= columns; a tall one is transposed) with Frobenius norm
``f``, ``X = M / f`` and ``G = X X^T`` (eigenvalues ``s_i^2 / f^2`` in
``[0, 1]``) and ``tau = t / f``:

* hard clip (``U min(s, t) V^T``): ``S = sign(G - tau^2 I)`` (the projector
  ``P = (I + S) / 2`` onto the singular values above ``t``), then
  ``F = (I - P) + tau P (tau^2 I + (G - tau^2 I) P)^{-1/2}`` and the result
  ``F M``: singular values below ``t`` are multiplied by 1, those above by
  ``t / s``;
* soft clip (SPECTRA's ``(I + M M^T / t^2)^{-1/2} M``): ``F = tau (tau^2 I
  + G)^{-1/2}``.

``sign`` and the inverse square root are Newton-Schulz iterations: the
accelerated quintic of Muon for ``ns_steps`` steps, then the classic quintic
Newton-Schulz step, which converges to the exact value (cubically), until
float precision.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _numerics, _stats, _thresholds, _transform, _tree, _validate
from optaxclip._stats import ClipStats
from optaxclip._thresholds import Threshold

_QUINTIC = (3.4445, -4.7750, 2.0315)  # Muon's accelerated Newton-Schulz step.
_POLISH = {4: 3, 8: 4}  # Newton-Schulz steps after it, by bytes per float.
_POWER_STEPS = 32  # Power steps on G^2 for the largest singular value.
_MIN_TAU = 2.0**-10  # The smallest threshold, relative to the Frobenius norm,
# that the iterations resolve (float32: tau^2 = 2^-20 beside eigenvalues <= 1).
_HIGHEST = jax.lax.Precision.HIGHEST


@_stats.named("clip_by_spectral_norm")
class ClipBySpectralNormState(NamedTuple):
  """State of :func:`clip_by_spectral_norm`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`: ``norm`` is the largest spectral
      norm (largest singular value) of the matrices at the last step,
      before the clip; ``scale`` ``min(1, max_norm / norm)``, the factor on
      that singular value; ``clipped`` whether any matrix's spectral norm
      exceeded ``max_norm``; ``frac_clipped`` the fraction of matrices
      (each layer of a stack counting as one) that did; ``leaf_norms``
      (``leaf_norms=True``) each clipped leaf's spectral norm, one per layer
      for a stacked leaf, ``None`` for the leaves passed through.
    clipped_norm: the largest spectral norm of the matrices after the clip.
    clipped_leaf_norms: (``leaf_norms=True``) each clipped leaf's spectral
      norm after the clip, a tree like ``leaf_norms``; ``None`` otherwise.
  """

  stats: ClipStats
  clipped_norm: jax.Array
  clipped_leaf_norms: Any = None


def clip_by_spectral_norm(
    max_norm: Threshold, *, ns_steps: int = 10, soft: bool = False,
    mask: Any = None, layer_axis: Any = None, leaf_norms: bool = False,
) -> optax.GradientTransformation:
  """Caps the singular values of every matrix in the update at ``max_norm``.

  Each matrix ``M = U diag(s) V^T`` becomes ``U diag(min(s, max_norm)) V^T``:
  the singular values above the threshold are lowered to it, the others and
  all singular vectors are kept. Where a norm clip scales a whole matrix
  down for one large direction, this clip lowers that direction only. It is
  computed without an SVD, with Newton-Schulz iterations (matrix products;
  see the module's notes), in float32 for float32, bfloat16 and float16
  matrices (float64 for float64), the result cast back.

  Placed before the optimizer, it clips the gradient (SPECTRA's
  pre-clipping, and the rule of arXiv 2605.11838); placed after the
  optimizer's direction and before the learning rate, it clips the update
  (SPECTRA's post-clipping), e.g. ``optax.chain(optax.scale_by_adam(),
  oc.clip_by_spectral_norm(c), optax.add_decayed_weights(wd),
  optax.scale_by_learning_rate(lr))``. A threshold that follows the
  learning rate (SPECTRA's warm-up) is a schedule.

  Which leaves: a leaf with at least two axes (besides its layer axis) is
  a stack of matrices, its last two axes each matrix's rows and columns,
  the leading axes (the layer axis, attention heads, a convolution's
  window) indexing the matrices, each clipped on its own. Leaves with
  fewer axes (biases, scales) are passed through unchanged (clip them with
  :func:`optaxclip.clip_by_norm` in a chain), and so are those ``mask``
  leaves out.

  Exactness, measured against the float64 SVD formula with singular
  values at least 5% away from the threshold: the spectral norm of the
  difference is about ``5e-7 * s_max`` in float32 (the rounding of ``M
  M^T``) once the iteration has converged, which it has when ``(s_max /
  max_norm)^2 <= 3.44^ns_steps / 2``: the default 10 steps cover ``s_max``
  up to about 300 times the threshold (error ``1.5e-4 * max_norm``
  there), 8 steps 100 times, 12 steps 1000 times (``3e-4``). Beyond that
  range, and for singular values close to the threshold, the singular
  vectors are still kept and the error falls on the singular values
  below or near the threshold, not on the top one: with 4 steps and
  ``s_max`` 1000 times the threshold the error was ``0.3 * max_norm``,
  yet the largest singular value after the clip stayed within ``1.0001 *
  max_norm`` in every setting measured (4 to 12 steps, ``s_max`` up to
  1000 times the threshold).

  Cost per ``m x n`` matrix (``m <= n``): about ``5 * ns_steps + 28`` products
  of ``m x m`` matrices (``soft``: ``4 * ns_steps + 13``) and two of ``m x
  n``, against AdamW's few passes over ``m * n`` numbers: on a CPU the
  clip dominates the step (``python -m benchmarks.spectral``).

  Edge cases, per matrix: a zero matrix is returned unchanged;
  ``max_norm=inf`` returns every matrix unchanged (bit for bit), ``0`` (or
  a negative or NaN run-time threshold) zeroes it; a matrix whose spectral
  norm is at most ``max_norm`` comes back within the exactness above (bit
  for bit when its Frobenius norm is at most ``max_norm``). A NaN or infinite entry makes that matrix's result NaN
  (its singular vectors are undefined); :func:`optaxclip.skip_step` drops
  such steps.

  Args:
    max_norm: the largest singular value allowed, in every matrix: a
      non-negative number, a JAX scalar, or an Optax schedule of the step
      count. ``inf`` disables clipping while keeping the statistics.
    ns_steps: how many accelerated (Muon's quintic) Newton-Schulz steps the
      sign iteration takes (the inverse square root takes half as many plus
      one), before the 3 (float64: 4) steps that converge to float
      precision; more
      steps cover a larger ratio of the largest singular value to the
      threshold. A Python int >= 1.
    soft: SPECTRA's soft clip ``(I + M M^T / max_norm^2)^{-1/2} M`` instead:
      each singular value ``s`` becomes ``s / sqrt(1 + s^2 / max_norm^2)``
      (below ``max_norm``, and about ``s`` for ``s`` much below it); one
      inverse square root (``ns_steps`` quintic steps), cheaper than the
      hard clip. The statistics are recorded the same way.
    mask: which leaves are clipped (as ``optax.masked``'s ``mask``):
      ``None`` (all matrices), a pytree prefix of the updates holding
      ``True`` or ``False``, or a function of the updates returning one
      (e.g. to leave out embeddings).
    layer_axis: for leaves that stack layers (Flax ``nnx.vmap`` /
      ``nnx.scan``), the axis that stacks them: an int for every leaf, or a
      pytree prefix of the updates holding ints and ``None``
      (:func:`optaxclip.layer_axes` reads it off a Flax NNX model). A
      stacked leaf counts as a matrix when it has two more axes, which must
      come after the layer axis; its ``leaf_norms`` entries are then one
      per layer (the largest over the other leading axes).
    leaf_norms: also keep each clipped leaf's spectral norm before
      (``stats.leaf_norms``) and after (``clipped_leaf_norms``) the clip;
      :func:`optaxclip.clip_stats` with ``scalars=True`` lists the former
      by path and layer.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ClipBySpectralNormState`. The spectral norms it records are
    estimates: ``norm`` by power iteration (``M M^T`` to the power 64),
    from below, within 1e-4 where the largest singular value stands 1%
    above the next and to float precision where 10%; ``clipped_norm`` the
    output's gain along the singular direction found for it.

  References:
    Jiang, Semenov and Stich, `Enhancing LLM Training via Spectral
    Clipping <https://arxiv.org/abs/2603.14315>`_ (SPECTRA), ICML 2026.

    `Gradient Clipping Beyond Vector Norms: A Spectral Approach for
    Matrix-Valued Parameters <https://arxiv.org/abs/2605.11838>`_, 2026.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> clip = oc.clip_by_spectral_norm(1.0)
    >>> grads = {"w": jnp.diag(jnp.array([4.0, 0.5])), "b": jnp.ones(2)}
    >>> state = clip.init(grads)
    >>> updates, state = clip.update(grads, state)
    >>> print(jnp.round(updates["w"], 4), updates["b"])
    [[1.  0. ]
     [0.  0.5]] [1. 1.]
    >>> print(state.stats.norm, jnp.round(state.clipped_norm, 4))
    4.0 1.0
  """
  caller = "clip_by_spectral_norm"
  _validate.check_threshold(max_norm, "max_norm", caller)
  _validate.check_int(ns_steps, "ns_steps", caller, lo=1)
  steps = _validate.static_size(ns_steps, "ns_steps", caller)
  _validate.check_bool(soft, "soft", caller)
  _validate.check_bool(leaf_norms, "leaf_norms", caller)
  _validate.check_mask(mask, caller)
  _validate.check_layer_axis(layer_axis, caller)

  def init_fn(params):
    dtype = _tree.tree_acc_dtype(params)
    chosen = _matrices(params, mask, layer_axis, caller)
    zeros = _per_leaf(params, chosen, lambda x, k: jnp.zeros(
        _tree.tensor_shape(x, k), _tree.acc_dtype(x.dtype)))
    return ClipBySpectralNormState(
        _stats.fresh(dtype, frac=True, threshold=_thresholds.resolve(
            max_norm, jnp.zeros((), jnp.int32), dtype),
            leaf_norms=zeros if leaf_norms else None),
        clipped_norm=jnp.zeros((), dtype),
        clipped_leaf_norms=zeros if leaf_norms else None)

  def update_fn(updates, state, params=None):
    del params
    stats = state.stats
    dtype = stats.norm.dtype
    t = _thresholds.resolve(max_norm, stats.count, dtype)
    chosen = _matrices(updates, mask, layer_axis, caller)
    leaves, rebuild = _tree.live_leaves(updates, caller)
    mats = [x for (_, x), k in zip(leaves, chosen) if k is not False]
    clipped = iter(_clip_all(mats, t, steps, soft))
    out, before, after, counts, num = [], [], [], [], 0
    for (_, x), k in zip(leaves, chosen):
      if k is False:
        out.append(x)
        continue
      y, b, a = next(clipped)
      layer = None if k is True else k
      out.append(y)
      counts.append(jnp.sum(b > t.astype(b.dtype), dtype=jnp.int32))
      num += int(np.size(b))
      before.append(_per_layer(b, layer))
      after.append(_per_layer(a, layer))
    largest = _largest([jnp.max(b) for b in before], dtype)
    over = sum(counts, jnp.zeros((), jnp.int32))
    return rebuild(out), ClipBySpectralNormState(
        _stats.advance(
            stats, clipped=over > 0, num=over,
            of=num, norm=largest,
            threshold=t, scale=_numerics.clip_scale(largest, t),
            leaf_norms=_spread(updates, chosen, before) if leaf_norms
            else None),
        clipped_norm=_largest([jnp.max(a) for a in after], dtype),
        clipped_leaf_norms=_spread(updates, chosen, after) if leaf_norms
        else None)

  return _transform.transformation(init_fn, update_fn)


def _matrices(tree: Any, mask: Any, layer_axis: Any, caller: str
              ) -> list[bool | int]:
  """Per live leaf: ``False`` (passed through), ``True`` (matrices, no
  layer axis) or its layer axis (matrices stacked by layer)."""
  leaves, _ = _tree.live_leaves(tree, caller)
  layers = _thresholds.leaf_layers(layer_axis, tree, caller)
  if mask is None:
    chosen = [True] * len(leaves)
  else:
    given = mask(tree) if callable(mask) else mask
    if given is None or callable(given):
      raise TypeError(f"{caller}: the mask function returned {given!r}; it"
                      " must return a tree of True/False.")
    _validate.check_mask(given, caller)
    full = _thresholds.broadcast_prefix(
        given, tree, "mask", caller, hint="Give True or False, or a pytree"
        " prefix of the gradients holding True/False.")
    chosen = [bool(m) for m in jax.tree_util.tree_leaves(full)]
  out: list[bool | int] = []
  for (path, x), k, c in zip(leaves, layers, chosen):
    matrix_axes = x.ndim - (k is not None)
    if not c or matrix_axes < 2 or 0 in x.shape[-2:]:
      out.append(False)
      continue
    if k is not None and k >= x.ndim - 2:
      raise ValueError(
          f"{caller}: layer_axis={k} is one of the last two axes of the"
          f" gradient leaf at {jax.tree_util.keystr(path) or 'root'} of"
          f" shape {x.shape}, which hold each matrix's rows and columns."
          " Give the axis that stacks the layers (a leading one), or None.")
    if jnp.iscomplexobj(x):
      raise TypeError(
          f"{caller}: the gradient leaf at"
          f" {jax.tree_util.keystr(path) or 'root'} is complex; spectral"
          " clipping takes real matrices. Leave it out with mask.")
    out.append(True if k is None else k)
  return out


def _per_leaf(tree: Any, chosen: list[bool | int], fn: Any) -> Any:
  """A tree like ``tree`` holding ``fn(leaf, layer)`` for the clipped
  leaves and ``None`` for the others."""
  leaves, rebuild = _tree.live_leaves(tree, "clip_by_spectral_norm")
  return rebuild([None if k is False else fn(x, None if k is True else k)
                  for (_, x), k in zip(leaves, chosen)])


def _spread(tree: Any, chosen: list[bool | int], values: list[jax.Array]
            ) -> Any:
  """Per-leaf values (one array per clipped leaf, in order) as a tree."""
  it = iter(values)
  return _per_leaf(tree, chosen, lambda x, k: next(it))


def _largest(values: list[jax.Array], dtype: Any) -> jax.Array:
  """The largest of ``values`` (0 for none) in ``dtype``; NaN wins."""
  if not values:
    return jnp.zeros((), dtype)
  return jnp.max(jnp.stack([v.astype(dtype) for v in values]))


def _clip_all(xs: list[jax.Array], t: jax.Array, steps: int, soft: bool
              ) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  """Each leaf's matrices clipped, and each matrix's spectral norm before
  and after (shape ``x.shape[:-2]``). The matrices of all leaves of one
  shape (up to transposition) and accumulation dtype are clipped as one
  batch, in that dtype, and cast back: one program per shape, not per
  leaf."""
  groups: dict[tuple[Any, ...], list[int]] = {}
  for i, x in enumerate(xs):
    key = (*sorted(x.shape[-2:]), _tree.acc_dtype(x.dtype))
    groups.setdefault(key, []).append(i)
  out: list[Any] = [None] * len(xs)
  for (m, n, acc), idx in groups.items():
    wide = [_wide(xs[i]).astype(acc).reshape(-1, m, n) for i in idx]
    y, before, after = _clip_stack(
        jnp.concatenate(wide) if len(wide) > 1 else wide[0],
        t.astype(acc), steps, soft)
    start = 0
    for i in idx:
      x = xs[i]
      stop = start + int(np.prod(x.shape[:-2], dtype=int))
      yi = y[start:stop].reshape(_wide(x).shape)
      out[i] = (_wide(yi, like=x).astype(x.dtype),
                before[start:stop].reshape(x.shape[:-2]),
                after[start:stop].reshape(x.shape[:-2]))
      start = stop
  return out


def _wide(x: jax.Array, like: jax.Array | None = None) -> jax.Array:
  """``x`` with its last two axes swapped where ``like`` (``x`` itself by
  default) has more rows than columns."""
  like = x if like is None else like
  tall = like.shape[-2] > like.shape[-1]
  return jnp.swapaxes(x, -1, -2) if tall else x


def _per_layer(v: jax.Array, layer: int | None) -> jax.Array:
  """Per-matrix values as the leaf's record: the largest per layer for a
  stacked leaf (shape ``(num_layers,)``), else the largest."""
  if layer is None:
    return jnp.max(v)
  return jnp.max(v, axis=tuple(a for a in range(v.ndim) if a != layer))


def _clip_stack(x: jax.Array, t: jax.Array, steps: int, soft: bool
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Every matrix of ``x`` (last two axes) clipped at ``t``, and each one's
  spectral norm before and after (shape ``x.shape[:-2]``)."""
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  eye = jnp.eye(x.shape[-2], dtype=x.dtype)
  # X = M / f without overflow: through the largest entry first.
  amax = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
  xs = x / jnp.where(amax > 0, amax, 1)
  fs = jnp.sqrt(jnp.sum(xs * xs, axis=(-2, -1), keepdims=True))
  xn = xs / jnp.where(fs > 0, fs, 1)
  f = amax * fs
  tau = t / jnp.where(f > 0, f, 1)
  # Below _MIN_TAU, tau^2 is lost beside G's eigenvalues and the iterations
  # do not converge: clip at f * _MIN_TAU instead, then scale the result by
  # t / (f * _MIN_TAU). The top singular value still lands on t; those
  # between t and f * _MIN_TAU end below t.
  lift = jnp.where(tau > 0, jnp.maximum(1, _MIN_TAU / tau), 1)
  keep = ((tau >= 1) | (f == 0)) & jnp.isfinite(f)
  tau = tau * lift
  tau2 = tau * tau
  g = _sym(_mm(xn, jnp.swapaxes(xn, -1, -2)))
  # A bound on G's largest eigenvalue, within m^(1/4) of it: ||G^2||_F^(1/2).
  g2 = _mm(g, g)
  top = jnp.sqrt(jnp.sqrt(jnp.sum(g2 * g2, axis=(-2, -1), keepdims=True)))
  if soft:
    bound = tau2 + top
    z = _inv_sqrt((tau2 * eye + g) / bound, steps)
    fm = (tau / jnp.sqrt(bound)) * z
    keep = (jnp.isinf(t) | (f == 0)) & jnp.isfinite(f)
  else:
    a = g - tau2 * eye
    s = _sign(a / jnp.maximum(tau2, top - tau2), steps)
    above = 0.5 * (eye + s)
    b = _sym(tau2 * eye + _mm(a, above))
    bound = jnp.maximum(tau2, top)
    z = _inv_sqrt(b / bound, steps // 2 + 1)
    fm = (eye - above) + (tau / jnp.sqrt(bound)) * _mm(above, z)
  # t = 0 zeroes the matrix; a NaN wins (the whole matrix NaN).
  zero = jnp.where(jnp.isfinite(f), 0, jnp.nan).astype(x.dtype)
  y = jnp.where(keep, x, jnp.where(t > 0, _mm(fm, x) / lift, zero))
  fmt = jnp.swapaxes(fm, -1, -2)
  # The largest singular value before, by power iteration on G^2, and
  # after: the output's gain along that direction (F is a monotone
  # function of G, so the top direction stays on top).
  v, eig = _top_eig(g2, g)
  gain = _mv(fm, _mv(g, _mv(fmt, v)))
  before = f[..., 0, 0] * jnp.sqrt(eig)
  after = f[..., 0, 0] * jnp.sqrt(jnp.maximum(jnp.sum(v * gain, axis=-1), 0)
                                 ) / lift[..., 0, 0]
  after = jnp.where(keep[..., 0, 0], before,
                    jnp.where(t > 0, after, zero[..., 0, 0]))
  if tall:
    y = jnp.swapaxes(y, -1, -2)
  return y, before, after


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """A matrix product in full float32 (no TF32 or bfloat16 passes)."""
  return jnp.matmul(a, b, precision=_HIGHEST)


def _mv(a: jax.Array, v: jax.Array) -> jax.Array:
  return jnp.einsum("...ij,...j->...i", a, v, precision=_HIGHEST)


def _sym(a: jax.Array) -> jax.Array:
  return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def _steps(steps: int, dtype: Any) -> jax.Array:
  """The coefficients ``(p, q, r)`` of each Newton-Schulz step, ``x (p + q
  x^2 + r x^4)``: Muon's quintic ``steps`` times (fast from small ``x``, it
  leaves ``x`` within ``[0.68, 1.2]``), then the quintic ``(15x - 10x^3 +
  3x^5) / 8``, which converges to 1 cubically, until float precision. One
  table, so that one loop runs all."""
  polish = _POLISH[np.dtype(dtype).itemsize]
  return jnp.asarray([_QUINTIC] * steps + [(15 / 8, -10 / 8, 3 / 8)] * polish,
                     dtype)


def _sign(a: jax.Array, steps: int) -> jax.Array:
  """The sign of symmetric ``a`` (eigenvalues in ``[-1, 1]``), by odd
  polynomials of it (:func:`_steps`)."""
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  table = _steps(steps, a.dtype)

  def step(i, a):
    p, q, r = table[i]
    a2 = _mm(a, a)
    return _mm(a, p * eye + q * a2 + r * _mm(a2, a2))

  return _sym(jax.lax.fori_loop(0, table.shape[0], step, a))


def _inv_sqrt(b: jax.Array, steps: int) -> jax.Array:
  """``b^{-1/2}`` for symmetric positive ``b`` (eigenvalues in ``(0, 1]``):
  the coupled Newton-Schulz iteration, which is the sign iteration of
  ``[[0, b], [I, 0]]`` (:func:`_steps`): ``y -> b^{1/2}``, ``z -> b^{-1/2}``."""
  eye = jnp.eye(b.shape[-1], dtype=b.dtype)
  table = _steps(steps, b.dtype)

  def step(i, yz):
    y, z = yz
    p, q, r = table[i]
    w = _mm(z, y)
    m = p * eye + q * w + r * _mm(w, w)
    return _mm(y, m), _mm(m, z)

  yz = (b, jnp.broadcast_to(eye, b.shape))
  return _sym(jax.lax.fori_loop(0, table.shape[0], step, yz)[1])


def _top_eig(a2: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The top eigenvector and eigenvalue of the symmetric positive
  semi-definite ``a`` (a batch), by power iteration on ``a2 = a @ a`` from
  a fixed generic vector (``a`` to the power ``2 * _POWER_STEPS``), then
  the Rayleigh quotient: an estimate from below."""
  start = np.random.default_rng(0).standard_normal(a.shape[-1]) + 1.0
  v = jnp.broadcast_to(jnp.asarray(start / np.linalg.norm(start), a.dtype),
                       a.shape[:-1])

  def step(_, v):
    w = _mv(a2, v)
    n = jnp.sqrt(jnp.sum(w * w, axis=-1, keepdims=True))
    return w / jnp.where(n > 0, n, 1)

  v = jax.lax.fori_loop(0, _POWER_STEPS, step, v)
  return v, jnp.maximum(jnp.sum(v * _mv(a, v), axis=-1), 0)

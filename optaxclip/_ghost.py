"""Ghost clipping: per-example norms of Flax NNX layers, no per-example grads.

``clipped_grad(fun, method="ghost", ...)`` runs ``fun`` once over the batch
(``jax.vmap`` over examples, as ``method="vmap"`` does, but of the forward
pass only) while the calls of ``nnx.Linear``, ``nnx.Embed`` (and its
``attend``) and ``nnx.Conv`` are intercepted: each records its input and adds
a zero *probe* to its output. One backward pass, to the probes, gives every
example's output gradient ``dy`` at every call. A layer's per-example weight
gradient is ``x_i^T dy_i`` (summed over positions and over the calls that
share the weight), so its norm follows from ``x`` and ``dy`` alone: in Gram
form ``sum_{t,s} (x_t . x_s)(dy_t . dy_s)``, or directly from the
``(batch, d, p)`` product, whichever costs fewer operations. Biases get
their per-example gradients, ``sum_t dy_t``, outright. A convolution
kernel's per-example gradient is the convolution's transpose applied to
``dy`` (never the unfolded patches); it is kept where it is smaller than
the layer's records ``x`` and ``dy``, else formed one example at a time
for its norm only. The clipped sum is ``sum_i w_i x_i^T dy_i``
(book-keeping, Bu et al. 2023): no second backward pass, and a dropped
example's NaN is selected away, never multiplied by 0. Where Explicit mesh
axes split the batch, the per-example work runs per device under
``shard_map``.

Every other parameter, and every parameter that the code also uses outside
an intercepted call (found from the traced program, not guessed), gets exact
per-example gradients: the forward pass sees one copy of it per example.

References: Li et al., Large Language Models Can Be Strong Differentially
Private Learners, 2021; Bu et al., Differentially Private Optimization on
Large Model at Small Cost, 2023.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip import _example_clip, _norms, _tree
from optaxclip._numerics import exponent, pow2

try:
  from flax import nnx
  from flax.nnx.nn.linear import canonicalize_padding
except ImportError:  # pragma: no cover - flax is an optional dependency.
  nnx = None

try:
  from jax._src.interpreters.partial_eval import dce_jaxpr as _dce
except ImportError:  # pragma: no cover - moved in another JAX version.
  _dce = None

_WHERE = "clipped_grad(method='ghost')"
_HIGHEST = jax.lax.Precision.HIGHEST


def prepare(fun: Callable[..., Any], args: tuple[Any, ...],
            kwargs: dict[str, Any], *, grad_nums: Sequence[int],
            batch_nums: Sequence[int], has_aux: bool, keep_batch_dim: bool,
            argnums_is_int: bool) -> tuple[Any, ...]:
  """Sets up one call of a ghost ``clipped_grad``.

  Returns ``fun``'s arguments with every ``nnx.Module`` in ``argnums``
  replaced by the ``nnx.State`` of its parameters, the gradient's leaves
  (shapes) and tree structure, and the function that clips one chunk of
  examples: ``(chunk_args, mask, threshold, **options) -> (sums, stats,
  aux)``.
  """
  if nnx is None:
    raise ImportError(f"{_WHERE} needs Flax (pip install flax).")
  new_args, rebuild = _example_clip.split_modules(args, tuple(grad_nums))
  for i in grad_nums:
    if i not in rebuild:
      for x in jax.tree_util.tree_leaves(args[i]):
        if not isinstance(x, (jax.Array, np.ndarray)):
          raise TypeError(
              f"{_WHERE}: argument {i} must be an nnx.Module or a pytree of"
              " arrays (such as the nnx.State of nnx.split); it holds a"
              f" {type(x).__name__}.")
  trees = [new_args[i] for i in grad_nums]
  leaves, treedef = jax.tree_util.tree_flatten(
      trees[0] if argnums_is_int else tuple(trees))
  if not leaves:
    raise ValueError(f"{_WHERE}: the differentiated arguments hold no"
                     " parameters.")
  model = _Model(fun, tuple(grad_nums), tuple(batch_nums), has_aux,
                 keep_batch_dim, kwargs, rebuild, treedef, argnums_is_int)
  return tuple(new_args), leaves, treedef, model.clip_chunk


# ----------------------------------------------------------------------------
# The model: discovery of the layer calls, then the forward and backward pass.


class _Call(NamedTuple):
  """One intercepted layer call, as discovered: static facts only."""
  kind: str                    # "linear", "general", "conv", "embed", "attend".
  roles: tuple[tuple[str, int], ...]  # (role, leaf index), e.g. ("kernel", 3).
  out: jax.ShapeDtypeStruct    # One example's output.
  spec: Any                    # A convolution's strides, padding, dilations.
  size: int                    # Rows of the weight's matrix (d or V).
  features: int                # Columns of ``dy``'s rows (p, or V for attend).
  loop: int = 0                # Iterations of the enclosing scan, or 0.
  sliced: bool = False         # Weights scanned over: one per iteration.


class _Model:
  """``fun`` with the differentiated arguments as one list of leaves."""

  def __init__(self, fun, grad_nums, batch_nums, has_aux, keep_batch_dim,
               kwargs, rebuild, treedef, argnums_is_int):
    self.single = argnums_is_int
    self.fun, self.grad_nums, self.batch_nums = fun, grad_nums, batch_nums
    self.has_aux, self.keep_batch_dim = has_aux, keep_batch_dim
    self.kwargs, self.rebuild, self.treedef = kwargs, rebuild, treedef

  def loss(self, tape, leaves, args, example):
    """One example's loss (and aux), run under ``tape``."""
    tree = jax.tree_util.tree_unflatten(self.treedef, leaves)
    trees = [tree] if self.single else list(tree)
    call = list(args)
    for i, t in zip(self.grad_nums, trees):
      call[i] = self.rebuild[i](t) if i in self.rebuild else t
    for i, x in zip(self.batch_nums, example):
      call[i] = (jax.tree_util.tree_map(lambda v: jnp.expand_dims(v, 0), x)
                 if self.keep_batch_dim else x)
    with _recording(tape):
      out = self.fun(*call, **self.kwargs)
    if self.has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"{_WHERE}: with has_aux=True, fun must return"
                        " (loss, aux).")
      out, aux = out
    else:
      aux = None
    if jnp.shape(out) != () or not jnp.issubdtype(jnp.result_type(out),
                                                  jnp.floating):
      raise TypeError(
          f"{_WHERE}: fun must return one example's loss, a float scalar (it"
          f" sees one example at a time); got shape {jnp.shape(out)}.")
    return out, aux

  def discover(self, args, leaves):
    """The intercepted calls, and which leaves are used outside them."""
    shape = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))  # noqa: E731
    example = [jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(
        jnp.shape(x)[1:], jnp.result_type(x)), args[i])
               for i in self.batch_nums]
    tape = _Tape("discover")

    def traced(leaves, dups, example):
      tape.start(leaves, dups=dups)
      return self.loss(tape, leaves, args, example)[0]

    leaf_shapes = [shape(x) for x in leaves]
    jaxpr = jax.make_jaxpr(traced)(leaf_shapes, leaf_shapes, example).jaxpr
    used = _used_inputs(jaxpr)[:len(leaves)]
    self.scopes = tape.scopes
    return tape.calls, used

  def clip_chunk(self, args, mask, threshold, *, per_layer, normalize,
                 nan_safe, caller, automatic=None):
    """The clipped sum over one chunk of examples, as ``_clip_sum`` returns."""
    leaves = jax.tree_util.tree_leaves(
        [args[i] for i in self.grad_nums])
    calls, used = self.discover(args, leaves)
    plan = _plan(calls, used, len(leaves))
    if not plan.active:
      raise ValueError(
          f"{caller}: no nnx.Linear, nnx.LinearGeneral, nnx.Embed or nnx.Conv"
          " call uses the"
          " differentiated parameters, so there is nothing to compute ghost"
          " norms of; method='ghost' needs a Flax NNX model (pass the"
          " nnx.Module, or the nnx.State that fun merges into one), or use"
          " method='vmap'.")
    batch = mask.shape[0]
    per_copy = plan.per_example
    example = [args[i] for i in self.batch_nums]
    like = _batch_sharding(example)
    copies = [jnp.broadcast_to(leaves[j], (batch,) + leaves[j].shape,
                               out_sharding=like(leaves[j].ndim + 1))
              for j in per_copy]
    probes = [jnp.zeros((batch,) + calls[c].out.shape, calls[c].out.dtype,
                        out_sharding=like(len(calls[c].out.shape) + 1))
              for c in plan.active]

    def one(copies, probes, example):
      mixed = list(leaves)
      for j, x in zip(per_copy, copies):
        mixed[j] = x
      tape = _Tape("run", calls=calls, probes=dict(zip(plan.active, probes)),
                   scopes=self.scopes)
      tape.start(mixed)
      loss, aux = self.loss(tape, mixed, args, example)
      return loss, (tape.saved, aux)

    forward = jax.vmap(one)
    loss, backward, (saved, aux) = jax.vjp(
        lambda c, p: forward(c, p, example), copies, probes, has_aux=True)
    copy_grads, dys = backward(jnp.ones_like(loss))
    dys = dict(zip(plan.active, dys))
    return _clip_from_records(
        leaves, calls, plan, saved, dys, copy_grads, self.treedef, threshold,
        mask, per_layer=per_layer, normalize=normalize, nan_safe=nan_safe,
        caller=caller, automatic=automatic) + (aux,)


def _batch_split(example):
  """``(mesh, axes)`` over which a mesh's Explicit axes split the batch axis
  of ``example``'s arrays, or ``None`` (not split, or Auto axes)."""
  for x in jax.tree_util.tree_leaves(example):
    sharding: Any = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec and spec[0] is not None:
      return sharding.mesh, spec[0]
  return None


def _batch_sharding(example):
  """``ndim -> sharding`` for new arrays with a batch axis: split as the
  batch is where a mesh's Explicit axes split it (vmap requires it of its
  inputs), else ``None`` (unspecified)."""
  split = _batch_split(example)
  if split is None:
    return lambda ndim: None
  mesh, axes = split
  return lambda ndim: jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(axes, *(None,) * (ndim - 1)))


def _used_inputs(jaxpr) -> list[bool]:
  """Which inputs of ``jaxpr`` its outputs (or effects) depend on: JAX's
  dead-code elimination, which looks into scans and checkpoints (where the
  parameters that the layer calls in them use may be nothing else's), or
  where it is missing, every input of a live equation."""
  if _dce is not None:
    return list(_dce(jaxpr, [True] * len(jaxpr.outvars))[1])
  live = {v for v in jaxpr.outvars if not hasattr(v, "val")}
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      live.update(v for v in eqn.invars if not hasattr(v, "val"))
  return [v in live for v in jaxpr.invars]


class _Plan(NamedTuple):
  ghost: dict[int, list[tuple[int, str]]]  # leaf -> [(call, role)]
  per_example: list[int]                   # leaves with per-example copies
  active: list[int]                        # calls that record and get probes


def _plan(calls, used, num_leaves) -> _Plan:
  """Which leaves get ghost norms, which per-example copies."""
  uses: dict[int, list[tuple[int, str]]] = {}
  for c, call in enumerate(calls):
    for role, j in call.roles:
      uses.setdefault(j, []).append((c, role))
  ghost = {}
  for j, u in uses.items():
    kinds = {(_term_kind(calls[c].kind, role), calls[c].spec,
              calls[c].sliced, calls[c].loop if calls[c].sliced else 0)
             for c, role in u}
    if not used[j] and len(kinds) == 1:
      ghost[j] = u
  per_example = [j for j in range(num_leaves)
                 if (used[j] or j in uses) and j not in ghost]
  active = sorted({c for u in ghost.values() for c, _ in u})
  return _Plan(ghost, per_example, active)


def _term_kind(kind, role):
  """How a leaf's per-example norm is found: from ``"matrix"`` terms
  (``x^T dy``), or per-example gradients of a ``"vector"`` (bias: ``sum_t
  dy_t``) or ``"conv"`` kernel (the convolution's transpose)."""
  if role == "bias":
    return "vector"
  return "conv" if kind == "conv" else "matrix"


# ----------------------------------------------------------------------------
# Norms and sums from the records.


def _clip_from_records(leaves, calls, plan, saved, dys, copy_grads, treedef,
                       threshold, mask, *, per_layer, normalize, nan_safe,
                       caller, automatic=None):
  acc = _tree.common_acc_dtype(leaves)
  saved = dict(zip(plan.active, saved))
  batch = mask.shape[0]
  # Leaves whose per-example gradients exist: copies and biases.
  explicit = dict(zip(plan.per_example, copy_grads))
  matrices, convs = {}, {}
  for j, uses in plan.ghost.items():
    kind = _term_kind(calls[uses[0][0]].kind, uses[0][1])
    if kind == "vector":
      explicit[j] = functools.reduce(jnp.add, [
          jnp.sum(dys[c].reshape(_rows(calls[c], batch) + (
              calls[c].features,)), axis=-2)
          for c, _ in uses]).reshape((batch,) + leaves[j].shape)
    elif kind == "conv":
      parts = [(calls[c].spec, _conv_batch(saved[c], calls[c].spec),
                _conv_batch(dys[c], calls[c].spec)) for c, _ in uses]
      if _keep_conv_grads(parts, leaves[j].shape):
        explicit[j] = _conv_grads(parts, leaves[j].shape, acc)
      else:
        convs[j] = parts
    else:
      matrices[j] = _terms(calls, uses, saved, dys, batch)
  order = sorted(explicit)
  if order:
    expl_norms, _ = _norms.example_norms([explicit[j] for j in order])
  else:
    expl_norms = []
  leaf_norms = [jnp.zeros((batch,), acc)] * len(leaves)
  for j, n in zip(order, expl_norms):
    leaf_norms[j] = n.astype(acc)
  for j, terms in matrices.items():
    n = _matrix_norm(terms, acc)
    stack = _stack(calls, plan.ghost[j])
    # A stacked weight: one matrix per iteration, its norm over all of them.
    leaf_norms[j] = _norms.example_norms([n.reshape(batch, stack)])[1] if (
        stack) else n
  for j, parts in convs.items():
    leaf_norms[j] = _conv_norm(parts, leaves[j].shape, acc)
  # The norm of all leaves, from theirs, without overflow.
  norms = _norms.example_norms([jnp.stack(leaf_norms, axis=1)])[1]
  weights, keep, stats = _example_clip.clip_weights(
      leaf_norms, norms, treedef, threshold, per_layer=per_layer,
      normalize=normalize, nan_safe=nan_safe, mask=mask, caller=caller,
      automatic=automatic)
  sums = []
  for j, x in enumerate(leaves):
    if j in explicit:
      sums.append(_example_clip.weighted_sum(explicit[j], weights[j], keep))
    elif j in matrices:
      stack = _stack(calls, plan.ghost[j])
      sums.append(_as_leaf(
          _stacked_sum(matrices[j], stack, weights[j], keep, acc), x.shape,
          calls[plan.ghost[j][0][0]].spec, stack))
    elif j in convs:
      sums.append(_conv_sum(convs[j], weights[j], keep, x.shape, acc))
    else:  # Not used by the loss.
      sums.append(jnp.zeros(x.shape, _tree.acc_dtype(x.dtype)))
  return sums, stats


def _stack(calls, uses) -> int:
  """The iterations of a weight scanned over (one slice each), or 0."""
  call = calls[uses[0][0]]
  return call.loop if call.sliced else 0


def _as_leaf(matrix, shape, perm, stack) -> jax.Array:
  """A weight's ``(V, F)`` (or ``(stack, V, F)``) matrix in the weight's
  shape; an ``nnx.Einsum`` kernel's axes were permuted by ``perm``."""
  if perm is None:
    return matrix.reshape(shape)
  lead = shape[:1] if stack else ()
  core = shape[len(lead):]
  moved = matrix.reshape(lead + tuple(core[a] for a in perm))
  return jnp.transpose(moved, tuple(range(len(lead))) + tuple(
      len(lead) + int(a) for a in np.argsort(perm)))


def _rows(call, batch) -> tuple[int, ...]:
  """The leading shape of a call's rows: ``(batch, T)``, or ``(batch,
  iterations, T)`` for a weight scanned over (``T`` as -1)."""
  return (batch, call.loop, -1) if call.sliced else (batch, -1)


def _stacked_sum(terms, stack, weights, keep, acc) -> jax.Array:
  """:func:`_matrix_sum`, of each iteration's slice of a weight scanned
  over (``stack`` of them; the terms' examples are ``(batch, stack)``
  flattened), or of an ordinary one (``stack`` 0)."""
  if not stack:
    return _matrix_sum(terms, weights, keep, acc)
  unfold = lambda v: v.reshape((-1, stack) + v.shape[1:])  # noqa: E731
  return jax.vmap(lambda pairs: _matrix_sum(
      [t._replace(a=a, c=c) for t, (a, c) in zip(terms, pairs)], weights,
      keep, acc), in_axes=1)([(unfold(t.a), unfold(t.c)) for t in terms])


class _Term(NamedTuple):
  """One call's share ``a^T c`` of a per-example weight gradient.

  ``a``: ``(batch, T, V)`` dense, or ``(batch, T)`` integer rows of a
  one-hot matrix with ``V`` columns (``ids``); ``c``: ``(batch, T, F)``.
  """
  a: jax.Array
  c: jax.Array
  ids: bool
  size: int


def _terms(calls, uses, saved, dys, batch) -> list[_Term]:
  """The dense terms of a leaf, concatenated, and its one-hot terms."""
  dense, onehot = [], []
  for c, _ in uses:
    call = calls[c]
    # A weight scanned over: each (example, iteration) is a term's row;
    # one shared by the iterations: they are rows of one example's term.
    lead = (batch * call.loop, -1) if call.sliced else (batch, -1)
    x = saved[c].reshape(lead + (saved[c].shape[-1:] if call.loop else
                                 saved[c].shape[2:]))
    dy = dys[c].reshape(lead + (call.features,))
    if call.kind == "embed":
      onehot.append((x, dy))
    elif call.kind == "attend":  # y = q @ E^T: E's gradient is dy^T q.
      dense.append((dy, x))
    else:
      dense.append((x, dy))
  size = calls[uses[0][0]].size
  out = []
  for group, ids in ((dense, False), (onehot, True)):
    if group:
      out.append(_Term(jnp.concatenate([a for a, _ in group], axis=1),
                       jnp.concatenate([c for _, c in group], axis=1),
                       ids, size))
  return out


def _matrix_norm(terms: list[_Term], acc) -> jax.Array:
  """Per-example 2-norm of ``sum_k a_k^T c_k``, Gram or direct by cost.

  Each example's factors are first scaled by powers of two that bring their
  largest entries near 1 (``2**-ea`` for the ``a``, ``2**-ec`` for the
  ``c``; a one-hot term's ``c`` takes both), so that no square overflows or
  underflows.
  """
  ea = exponent(_max_abs([t.a for t in terms if not t.ids], acc))
  ec = exponent(_max_abs([t.c for t in terms], acc))
  down = lambda x, e: x.astype(acc) * pow2(  # noqa: E731
      -e, acc).reshape((-1,) + (1,) * (x.ndim - 1))
  terms = [t._replace(a=t.a, c=down(t.c, ea + ec)) if t.ids else
           t._replace(a=down(t.a, ea), c=down(t.c, ec)) for t in terms]
  length = sum(t.a.shape[1] for t in terms)
  size, features = terms[0].size, terms[0].c.shape[-1]
  if _use_gram(length, size, features):
    sq = sum(
        (1 if k == m else 2) * jnp.sum(
            _gram_a(terms[k], terms[m], acc) * jnp.einsum(
                "btf,bsf->bts", terms[k].c, terms[m].c, precision=_HIGHEST),
            axis=(1, 2))
        for k in range(len(terms)) for m in range(k, len(terms)))
  else:
    g = sum(_per_example_matrix(t, acc) for t in terms)
    sq = jnp.sum(jnp.square(g), axis=(1, 2))
  # Two factors: ea + ec may leave the normal range.
  return jnp.sqrt(sq) * pow2(ea, acc) * pow2(ec, acc)


def _use_gram(length: int, size: int, features: int) -> bool:
  """Gram form (``T^2 (V + F)`` operations) or direct (``T V F``)."""
  return length * length * (size + features) <= length * size * features


def _max_abs(arrays, acc):
  if not arrays:  # 0 gives the exponent 0.
    return jnp.zeros((), acc)
  return functools.reduce(jnp.maximum, [
      jnp.max(jnp.abs(x.astype(acc)), axis=tuple(range(1, x.ndim)), initial=0)
      for x in arrays])


def _gram_a(s: _Term, t: _Term, acc) -> jax.Array:
  """``(batch, T_s, T_t)`` inner products of the rows of ``s.a`` and ``t.a``."""
  if not s.ids and not t.ids:
    return jnp.einsum("btv,bsv->bts", s.a, t.a, precision=_HIGHEST)
  if s.ids and t.ids:
    return (_valid(s) & _valid(t).transpose(0, 2, 1) & (
        s.a[:, :, None] == t.a[:, None, :])).astype(acc)
  if t.ids:
    return _gram_a(t, s, acc).transpose(0, 2, 1)
  # Row id of s against dense rows of t: t.a[b, u, id].
  ids = jnp.clip(s.a, 0, s.size - 1)
  rows = jax.vmap(lambda a, i: a[:, i].T)(t.a, ids)
  return jnp.where(_valid(s), rows, 0)


def _valid(t: _Term) -> jax.Array:
  return ((t.a >= 0) & (t.a < t.size))[:, :, None]


def _per_example_matrix(t: _Term, acc) -> jax.Array:
  """``(batch, V, F)``: each example's ``a^T c``."""
  if t.ids:
    return jax.vmap(lambda c, i: jax.ops.segment_sum(
        c, i, num_segments=t.size))(t.c, t.a)
  return jnp.einsum("btv,btf->bvf", t.a, t.c, precision=_HIGHEST)


def _matrix_sum(terms, weights, keep, acc) -> jax.Array:
  """``sum_i w_i a_i^T c_i`` over the kept examples: ``(V, F)``."""

  def total(arrays):
    weights, keep, pairs = arrays
    k = keep.reshape((-1, 1, 1))
    parts = []
    for t, (a, c) in zip(terms, pairs):
      c = jnp.where(k, c, 0).astype(acc) * weights.astype(acc)[:, None, None]
      if t.ids:
        parts.append(jax.ops.segment_sum(
            c.reshape(-1, c.shape[-1]), a.reshape(-1), num_segments=t.size))
      else:
        parts.append(jnp.einsum("btv,btf->vf", jnp.where(k, a, 0).astype(acc),
                                c, precision=_HIGHEST))
    return functools.reduce(jnp.add, parts)

  return _summed(total, (weights, keep, [(t.a, t.c) for t in terms]))


def _keep_conv_grads(parts, kernel_shape) -> bool:
  """Whether a convolution kernel keeps its per-example gradients.

  The clipped sum needs, per example, either the kernel's gradient (kept
  from the norms: :func:`_conv_grads`) or the records it comes from, ``x``
  and ``dy`` of every call (book-keeping: :func:`_conv_norm`,
  :func:`_conv_sum`). Both stay live until every norm is known, so the
  smaller is kept: the gradient for the first layers of a CNN (small
  kernels, large images), the records for the deep ones. Measured on the
  benchmark CNN at batch 256: 156.6 MiB against 190.6 with gradients
  everywhere (the non-private step: 134.6).

  ``parts`` holds each call's ``(spec, x, dy)``, ``x`` and ``dy`` as
  :func:`_conv_batch` shapes them; so do the functions below.
  """
  records = sum(int(np.prod(x.shape[1:])) + int(np.prod(dy.shape[1:]))
                for _, x, dy in parts)
  return int(np.prod(kernel_shape)) < records


def _conv_norm(parts, kernel_shape, acc) -> jax.Array:
  """Per-example norms of a convolution kernel's gradient, from its records.

  One example at a time (a ``lax.map``): the gradient of one example lives
  at a time, never the batch's. Measured on XLA:CPU for a 3x3x64x64 kernel
  at batch 256: 271 ms one at a time, 112 ms for the whole batch at once
  (which holds every gradient), 1503 ms in vmapped chunks of 32 (XLA:CPU's
  batched backward-filter convolution is slow on small batches inside a
  loop). Where Explicit mesh axes split the batch, each device takes its
  own examples.
  """
  grads = functools.partial(_conv_example_grad, specs=[p[0] for p in parts],
                            kernel_shape=kernel_shape, acc=acc)
  return _per_device(lambda a: jax.lax.map(
      lambda ex: _norms.example_norms([grads(ex)[None]])[1][0], a),
                     [(x, dy) for _, x, dy in parts])


def _conv_example_grad(pairs, *, specs, kernel_shape, acc) -> jax.Array:
  """One example's kernel gradient, summed over calls."""
  return functools.reduce(jnp.add, [
      _conv_transpose(spec, x, dy, kernel_shape, acc)
      for spec, (x, dy) in zip(specs, pairs)])


def _conv_sum(parts, weights, keep, kernel_shape, acc) -> jax.Array:
  """``sum_i w_i g_i`` over the kept examples of a convolution kernel.

  One backward-filter convolution over the whole batch, its output
  gradients weighted: the examples are the convolution's batch, over which
  it sums. Dropped examples are selected away in ``x`` and ``dy`` alike, so
  a NaN there adds exactly 0.
  """
  def total(arrays):
    out = jnp.zeros(kernel_shape, acc)
    for (spec, _, _), (x, dy, keep, weights) in zip(parts, arrays):
      k = keep.reshape((-1,) + (1,) * (x.ndim - 1))
      x = jnp.where(k, x, 0).astype(acc)
      dy = jnp.where(k, dy, 0).astype(acc) * weights.astype(acc).reshape(
          (-1,) + (1,) * (dy.ndim - 1))
      flat = lambda v: v.reshape((-1,) + v.shape[2:])  # noqa: E731
      out = out + _conv_transpose(spec, flat(x), flat(dy), kernel_shape, acc)
    return out

  return _summed(total, [(x, dy, keep, weights) for _, x, dy in parts])


def _conv_grads(parts, kernel_shape, acc) -> jax.Array:
  """Per-example kernel gradients, summed over calls: ``(batch, *kernel)``.

  ``parts`` holds each call's ``(spec, x, dy)``. An example's kernel
  gradient is the transpose of the convolution in its kernel (XLA's
  backward-filter convolution) applied to its ``dy``: ``batch x kernel
  size`` floats, never the unfolded input patches. Their norms are taken as
  :func:`optaxclip._per_example.example_norms` takes them (exact unless an
  entry of a gradient overflows, as with ``method="vmap"``). Where Explicit
  mesh axes split the batch, each device forms its own examples'
  (``shard_map``).

  Known upstream fault: where the batch is split over devices under *Auto*
  mesh axes, XLA's SPMD partitioner miscompiles this batched
  backward-filter convolution (the other devices' examples come out 0;
  measured on 8 CPU devices with jax 0.10.2), as it does
  ``jax.vmap(jax.grad(...))`` of any convolution there, and so
  ``method="vmap"`` too. Explicit axes are not affected.
  """
  grads = jax.vmap(functools.partial(
      _conv_example_grad, specs=[p[0] for p in parts],
      kernel_shape=kernel_shape, acc=acc))
  return _per_device(grads, [(x, dy) for _, x, dy in parts])


def _per_device(fn, arrays):
  """``fn(arrays)``, per-example results of per-example arrays; where
  Explicit mesh axes split the batch, each device runs ``fn`` on its own
  examples (``shard_map``, see :func:`_summed` for ``check_vma``)."""
  split = _batch_split(arrays)
  if split is None:
    return fn(arrays)
  spec = jax.sharding.PartitionSpec(split[1])
  return jax.shard_map(fn, mesh=split[0], in_specs=spec, out_specs=spec,
                       check_vma=False)(arrays)


def _summed(fn, arrays):
  """``fn(arrays)``, a sum over the batch axis of ``arrays``: where Explicit
  mesh axes split the batch, each device sums its own examples and the
  partial sums are added up (a ``psum``).

  Both this ``shard_map`` and :func:`_per_device`'s run with
  ``check_vma=False``: with it, the transpose of a convolution in a kernel
  that is the same on every device (the zeros :func:`_conv_transpose`
  starts from) would already be summed over the devices, per example
  too.
  """
  split = _batch_split(arrays)
  if split is None:
    return fn(arrays)
  mesh, axes = split
  spec = jax.sharding.PartitionSpec(axes)
  return jax.shard_map(lambda a: jax.lax.psum(fn(a), axes), mesh=mesh,
                       in_specs=spec, out_specs=jax.sharding.PartitionSpec(),
                       check_vma=False)(arrays)


def _conv_batch(v, spec):
  """``(batch, n, *spatial, C)``: each example's calls as a conv batch."""
  rank = len(spec[0])
  return v.reshape((v.shape[0], -1) + v.shape[v.ndim - rank - 1:])


def _conv_transpose(spec, x, dy, kernel_shape, acc) -> jax.Array:
  """The kernel gradient ``sum over the batch of x and dy``: the transpose of
  the convolution of ``x`` (``(N, *spatial, C)``) in its kernel."""
  strides, padding, lhs_dilation, rhs_dilation = spec
  dn = _conv_dims(len(strides) + 2)
  conv = lambda k: jax.lax.conv_general_dilated(  # noqa: E731
      x.astype(acc), k, strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dn, precision=_HIGHEST)
  return jax.linear_transpose(conv, jnp.zeros(kernel_shape, acc))(
      dy.astype(acc))[0]


def _conv_dims(n):
  """Flax's layout: inputs ``(N, *spatial, C)``, kernels ``(*window, I, O)``."""
  lhs = (0, n - 1) + tuple(range(1, n - 1))
  return jax.lax.ConvDimensionNumbers(lhs, (n - 1, n - 2) + tuple(
      range(n - 2)), lhs)


# ----------------------------------------------------------------------------
# Interception of the layer calls.


_local = threading.local()
_lock = threading.Lock()
_patched = [0]


class _Frame(NamedTuple):
  """The trace that the layer calls run in: ``fun``'s own, or the body of a
  ``jax.lax.scan`` or ``jax.checkpoint`` inside it."""
  index: dict[int, tuple[int, bool]]  # id(value) -> (leaf, a slice of it?)
  dups: dict[int, Any]       # leaf -> its stand-in (discovery).
  probes: dict[int, Any]     # call -> the probe added to its output.
  saved: list[jax.Array]     # The records of this trace's calls.
  loop: int                  # Iterations of the enclosing scan, 0 if none.
  suspended: bool            # In a nested scan: nothing is intercepted.


class _Tape:
  """What one trace of ``fun`` records of its layer calls.

  A ``jax.lax.scan`` or ``jax.checkpoint`` inside ``fun`` traces its body
  apart: :meth:`subtrace` passes the probes of the body's calls in (and in
  discovery the stand-ins of its parameters), and the records out, as extra
  inputs and outputs, so a scan stacks them over its iterations. A
  parameter scanned over (``nnx.scan`` over modules stacked by ``nnx.vmap``)
  is found in the body as a slice: each iteration's weights are a matrix of
  their own.
  """

  def __init__(self, mode, calls=None, probes=None, scopes=None):
    self.mode = mode
    self.calls: list[_Call] = [] if calls is None else calls
    self.scopes: list[tuple[int, int]] = [] if scopes is None else scopes
    self.top_probes = probes or {}

  def start(self, leaves, dups=None):
    self.frame = _Frame({id(x): (j, False) for j, x in enumerate(leaves)},
                        dict(enumerate(dups or ())), self.top_probes, [], 0,
                        False)
    self.count = 0
    self.serial = 0

  @property
  def saved(self) -> list[jax.Array]:
    return self.frame.saved

  def call(self, kind, original, module, x, args, kwargs, layout=None):
    f = self.frame
    roles = None if f.suspended or (f.loop and kind not in _LOOPED) else (
        _ROLES[kind](module, x))
    hits = [f.index.get(id(v.value)) for v in (roles or {}).values()]
    if (roles is None or None in hits
        or len({s for _, s in hits}) != 1):  # type: ignore[misc]
      return original(module, x, *args, **kwargs)
    found = tuple((r, h[0]) for r, h in zip(roles, hits))  # type: ignore[index]
    sliced = bool(hits[0][1])  # type: ignore[index]
    c = self.count
    self.count += 1
    if self.mode == "discover":
      # The call reads the stand-ins: a use of the parameter found in the
      # traced program is a use outside the calls. A shallow copy of the
      # module holds them, so no Variable of another trace is mutated.
      stand_in = copy.copy(module)
      for r, j in found:
        object.__setattr__(stand_in, r, roles[r].replace(f.dups[j]))
      y = original(stand_in, x, *args, **kwargs)
      if layout is None:
        size, features = _matrix_shape(kind, module, y,
                                       roles[found[0][0]].value)
        spec = _conv_spec(module) if kind == "conv" else None
        shape = y.shape
      else:  # The rows, then the output axes, as the probe is laid out.
        size, features, spec = layout.size, layout.features, layout.kernel
        shape = tuple(y.shape[a] for a in layout.y)
      out = ((f.loop,) if f.loop else ()) + shape
      self.calls.append(_Call(
          kind, found, jax.ShapeDtypeStruct(out, y.dtype), spec, size,
          features, f.loop, sliced))
      return y
    want = self.calls[c] if c < len(self.calls) else None
    if want is None or (want.kind, want.roles, want.loop, want.sliced) != (
        kind, found, f.loop, sliced):
      raise RuntimeError(f"{_WHERE}: fun made different layer calls on two"
                         " traces; its calls must depend only on shapes.")
    y = original(module, x, *args, **kwargs)
    if c in f.probes:
      if layout is None:
        f.saved.append(_RECORD[kind](module, x))
        y = y + f.probes[c]
      else:
        f.saved.append(jnp.transpose(x, layout.x).reshape(-1, layout.size))
        y = y + jnp.transpose(f.probes[c],
                              tuple(np.argsort(layout.y).tolist()))
    return y

  def subtrace(self, run, inputs, loop):
    """``run(within, extra)`` traces a body apart: a scan's over ``loop``
    iterations of ``inputs`` (sliced), or a checkpoint's (``loop`` 0).

    The body calls ``within(inner, extra_inner, fn)``, where ``inner`` are
    the body's own values of ``inputs``, ``extra_inner`` of ``extra`` (in
    discovery the stand-ins of the parameters in ``inputs``, else the
    probes of the body's calls): it runs ``fn()`` with the calls recorded in
    the body's frame and returns ``(fn(), records)``. ``run`` returns
    ``(out, records)`` where its body returned them; this returns ``out``.
    """
    parent = self.frame
    flat = jax.tree_util.tree_leaves(inputs)
    matched = {k: parent.index[id(x)] for k, x in enumerate(flat)
               if id(x) in parent.index}
    serial, start = self.serial, self.count
    self.serial += 1
    nested = bool(parent.suspended or (loop and parent.loop))
    discover = self.mode == "discover"
    if discover:
      extra = {j: parent.dups[j] for j, _ in matched.values()}
    else:
      first, last = self.scopes[serial]
      extra = {c: p for c, p in parent.probes.items() if first <= c < last}

    def within(inner, extra, fn):
      flat = jax.tree_util.tree_leaves(inner)
      index = dict(parent.index)  # Closed over: the same in every iteration.
      index.update({id(flat[k]): (j, s or bool(loop))
                    for k, (j, s) in matched.items()})
      frame = _Frame(index, {**parent.dups, **extra} if discover else {},
                     {} if discover else extra, [], loop or parent.loop,
                     nested)
      # A retrace (jax.lax.scan's, for weak types) starts again.
      self.count, self.serial = start, serial + 1
      if discover:
        del self.calls[start:]
        del self.scopes[serial:]
        self.scopes.append((start, start))
      self.frame = frame
      try:
        out = fn()
      finally:
        self.frame = parent
        if discover:
          self.scopes[serial] = (start, self.count)
      return out, frame.saved

    out, saved = run(within, extra)
    parent.saved.extend(saved)
    return out


def _scan(tape, original, f, init, xs, length, kw):
  """``jax.lax.scan(f, init, xs, length, **kw)`` with ``f`` traced under
  ``tape``: the records of its calls come out stacked over the iterations."""
  flat = jax.tree_util.tree_leaves(xs)
  loop = length if length is not None else flat[0].shape[0]

  def run(within, extra):
    def body(carry, both):
      x, e = both
      (carry, ys), saved = within(x, e, lambda: f(carry, x))
      return carry, (ys, saved)

    carry, (ys, saved) = original(body, init, (xs, extra), length=length,
                                  **kw)
    return (carry, ys), saved

  return tape.subtrace(run, xs, loop)


def _checkpointed(tape, original, fun, kw, args, kwargs):
  """``jax.checkpoint(fun, **kw)(*args, **kwargs)`` with ``fun`` traced
  under ``tape``: the records of its calls are outputs (kept, not
  recomputed: the norms need them)."""

  def run(within, extra):
    def inner(a, k, e):
      return within((a, k), e, lambda: fun(*a, **k))
    return original(inner, **kw)(args, kwargs, extra)

  return tape.subtrace(run, (args, kwargs), 0)


def _kernel_roles(module):
  roles = {"kernel": module.kernel}
  if module.bias is not None:
    roles["bias"] = module.bias
  return roles


def _linear_roles(module, x):
  if module.dot_general is not jax.lax.dot_general:
    return None
  return _kernel_roles(module)


def _general_roles(module, x):
  if (module.batch_axis or module.dot_general_cls is not None
      or module.dot_general not in (None, jax.lax.dot_general)):
    return None
  return _kernel_roles(module)


def _conv_roles(module, x):
  if (module.feature_group_count != 1 or module.mask is not None
      or module.conv_general_dilated is not jax.lax.conv_general_dilated
      or _conv_padding(module) is None):
    return None
  return _kernel_roles(module)


def _embed_roles(module, x):
  return {"embedding": module.embedding}


_LOOPED = ("linear", "general", "einsum", "lora_a", "lora_b")  # Kinds recorded inside a scan.
_ROLES = {"linear": _linear_roles, "general": _general_roles,
          "conv": _conv_roles,
          "embed": _embed_roles, "attend": _embed_roles,
          "einsum": lambda m, x: _kernel_roles(m),
          "lora_a": lambda m, x: {"lora_a": m.lora_a},
          "lora_b": lambda m, x: {"lora_b": m.lora_b}}


def _conv_padding(module):
  rank = len(module.kernel_size)
  padding = canonicalize_padding(module.padding, rank)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    return None
  return padding


def _conv_spec(module):
  """``(strides, padding, lhs_dilation, rhs_dilation)`` as nnx.Conv uses them."""
  rank = len(module.kernel_size)
  fill = lambda v: (1,) * rank if v is None else (  # noqa: E731
      (v,) * rank if isinstance(v, int) else tuple(v))
  padding = _conv_padding(module)
  if not isinstance(padding, str):
    padding = tuple(tuple(p) for p in padding)
  return (fill(module.strides), padding, fill(module.input_dilation),
          fill(module.kernel_dilation))


def _matrix_shape(kind, module, y, weight):
  """``(rows, columns)`` of the weight as a matrix ``x^T dy`` forms: an
  ``nnx.LinearGeneral`` kernel flattened to ``(prod(in), prod(out))``."""
  if kind == "general":
    return (math.prod(module.in_features), math.prod(module.out_features))
  return weight.shape[0], y.shape[-1]


def _general_rows(module, x):
  """``x`` with ``nnx.LinearGeneral``'s contracting axes last, flattened."""
  axes = [a % x.ndim for a in (module.axis if isinstance(module.axis, Sequence)
                                else (module.axis,))]
  moved = jnp.moveaxis(x, axes, range(x.ndim - len(axes), x.ndim))
  return moved.reshape(-1, math.prod(module.in_features))


class _Layout(NamedTuple):
  """An ``nnx.Einsum`` call as a matrix product ``x K``: the axes of ``x``,
  ``y`` and the kernel, each put as rows (``x``, ``y``) then contracted
  (``x``, kernel) or output (``y``, kernel) axes; the matrix's shape."""
  x: tuple[int, ...]
  y: tuple[int, ...]
  kernel: tuple[int, ...]
  size: int
  features: int


def _einsum_layout(module, x, args, kwargs) -> _Layout | None:
  """The layout of an ``nnx.Einsum`` call, or ``None`` where its equation
  is not a matrix product (a kernel axis shared with the output and the
  input, an input axis summed alone, a repeated axis, ...)."""
  if module.einsum_op is not jnp.einsum or len(args) > 1:
    return None
  eq = args[0] if args else kwargs.get("einsum_str")
  eq = module.einsum_str if eq is None else eq
  if eq is None:
    return None
  kernel = module.kernel.value
  try:
    import opt_einsum  # type: ignore[import-untyped]  # Flax needs it.
    ins, out, _ = opt_einsum.parser.parse_einsum_input(
        (eq.replace(" ", ""), x, kernel))
    lhs, rhs = ins.split(",")
  except Exception:  # noqa: BLE001 - Flax raises its own error.
    return None
  rows = [c for c in out if c not in rhs]
  contracted = [c for c in lhs if c in rhs]
  outs = [c for c in out if c in rhs]
  if (any(len(set(t)) != len(t) for t in (lhs, rhs, out))
      or set(rhs) != set(contracted) | set(outs) or set(contracted) & set(out)
      or set(lhs) != set(rows) | set(contracted)):
    return None
  k = [rhs.index(c) for c in contracted + outs]
  return _Layout(tuple(lhs.index(c) for c in rows + contracted),
                 tuple(out.index(c) for c in rows + outs), tuple(k),
                 math.prod(kernel.shape[a] for a in k[:len(contracted)]),
                 math.prod(kernel.shape[a] for a in k[len(contracted):]))


def _plain_lora(module, x) -> bool:
  """Whether ``nnx.LoRA``'s dtype promotion changes nothing (then its two
  products are intercepted one by one)."""
  dtypes = {jnp.result_type(x), module.lora_a.value.dtype,
            module.lora_b.value.dtype}
  return (len(dtypes) == 1 and module.dtype in (None, *dtypes)
          and (module.base_module is None or callable(module.base_module)))


def _lora_a(module, x):
  return x @ module.lora_a[...]


def _lora_b(module, h):
  return h @ module.lora_b[...]


def _embed_ids(size, ids):
  """The rows ``jnp.take`` reads: negative ids count from the end."""
  if size == 1:  # nnx.Embed broadcasts its one row.
    return jnp.zeros_like(ids)
  return jnp.where(ids < 0, ids + size, ids)


_RECORD = {
    "linear": lambda m, x: x.reshape(-1, x.shape[-1]),
    "general": _general_rows,
    "lora_a": lambda m, x: x.reshape(-1, x.shape[-1]),
    "lora_b": lambda m, x: x.reshape(-1, x.shape[-1]),
    "attend": lambda m, x: x.reshape(-1, x.shape[-1]),
    "embed": lambda m, x: _embed_ids(m.num_embeddings, x.reshape(-1)),
    "conv": lambda m, x: x.reshape(
        (-1,) + x.shape[x.ndim - len(m.kernel_size) - 1:]),
}


def _methods():
  return {("linear", nnx.Linear, "__call__"),
          ("general", nnx.LinearGeneral, "__call__"),
          ("conv", nnx.Conv, "__call__"),
          ("embed", nnx.Embed, "__call__"), ("attend", nnx.Embed, "attend"),
          ("einsum", nnx.Einsum, "__call__"), ("lora", nnx.LoRA, "__call__"), ("scan", jax.lax, "scan"), ("checkpoint", jax, "checkpoint")}


def _intercepting(kind, original):
  if kind == "scan":
    def method(f, init, xs=None, length=None, **kw):
      tape = getattr(_local, "tape", None)
      if tape is None:
        return original(f, init, xs, length=length, **kw)
      return _scan(tape, original, f, init, xs, length, kw)
  elif kind == "einsum":
    def method(self, x, *args, **kwargs):  # type: ignore[misc]
      tape = getattr(_local, "tape", None)
      layout = None if tape is None else _einsum_layout(self, x, args, kwargs)
      if tape is None or layout is None:
        return original(self, x, *args, **kwargs)
      return tape.call(kind, original, self, x, args, kwargs, layout)
  elif kind == "lora":
    def method(self, x, **kwargs):  # type: ignore[misc]
      tape = getattr(_local, "tape", None)
      if tape is None or not _plain_lora(self, x):
        return original(self, x, **kwargs)
      # x @ lora_a @ lora_b as two matrix calls, in the same order.
      h = tape.call("lora_a", _lora_a, self, x, (), {})
      out = tape.call("lora_b", _lora_b, self, h, (), {})
      if self.base_module is not None:
        out += self.base_module(x, **kwargs)
      return out
  elif kind == "checkpoint":
    def method(fun=None, **kw):  # type: ignore[misc]
      tape = getattr(_local, "tape", None)
      if fun is None:
        return functools.partial(method, **kw)
      if tape is None or kw.get("static_argnums"):
        return original(fun, **kw)
      return lambda *args, **kwargs: _checkpointed(
          tape, original, fun, kw, args, kwargs)
  else:
    def method(self, x, *args, **kwargs):  # type: ignore[misc]
      tape = getattr(_local, "tape", None)
      if tape is None:
        return original(self, x, *args, **kwargs)
      return tape.call(kind, original, self, x, args, kwargs)
  method = functools.wraps(original)(method)
  method._ghost_original = original  # type: ignore[attr-defined]
  return method


@contextlib.contextmanager
def _recording(tape):
  """Routes the supported layers' calls in this thread through ``tape``."""
  if getattr(_local, "tape", None) is not None:
    raise RuntimeError(f"{_WHERE} cannot run inside another ghost"
                       " clipped_grad's fun.")
  with _lock:
    if not _patched[0]:
      for kind, cls, name in _methods():
        setattr(cls, name, _intercepting(kind, getattr(cls, name)))
    _patched[0] += 1
  _local.tape = tape
  try:
    yield
  finally:
    _local.tape = None
    with _lock:
      _patched[0] -= 1
      if not _patched[0]:
        for _, cls, name in _methods():
          setattr(cls, name, getattr(cls, name)._ghost_original)

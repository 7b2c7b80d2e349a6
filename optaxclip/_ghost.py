"""Ghost clipping: per-example gradient norms read from the loss's jaxpr.

``clipped_grad(fun, method="ghost", ...)`` traces one example's loss with
``jax.make_jaxpr`` and finds, in the traced program, where each
differentiated leaf (of whatever pytree ``argnums`` selects: an NNX state,
linen params, an Equinox module's arrays, a dict) enters the computation.
A leaf that enters exactly once a ``dot_general`` (dense, einsum, attention
projections), a ``conv_general_dilated``, a ``gather`` (embedding lookups)
or an elementwise ``mul``/``add``/``sub`` (norm scales and biases, with
broadcasting), against an operand that depends on the example, possibly
through reshapes, transposes, casts, slices and broadcasts, and possibly
inside ``jit``, ``lax.scan`` (once per iteration of a scanned-over slice)
and ``checkpoint``/``remat`` bodies, gets a *ghost* norm. Every other leaf
*falls back*: its per-example gradients are formed (one copy of the leaf
per example), for that leaf alone.

Two passes over the batch, each ``jax.vmap`` over examples of an
interpretation of the jaxpr:

1. Norms. Each ghost use runs as a ``custom_vjp`` call with an extra
   per-example input, a zero *token*. Its backward rule gets the use's
   operands (activations) and output cotangent, propagates the cotangent to
   the activations as usual, and returns the example's norm of the leaf's
   gradient as the token's cotangent: from the Gram form
   ``sum_{t,s} (x_t . x_s)(dy_t . dy_s)`` or the product ``x^T dy``
   (whichever is cheaper) for a matrix product, the same over token ids for
   an embedding lookup, else the leaf's per-example gradient through the
   primitive's own transpose. Inside a rematerialised block the rule runs in
   the recomputed backward, so nothing is kept outside the block; inside a
   scan the tokens are scanned over, one per iteration. One backward pass
   of the batch gives every token's norm and the fallback leaves'
   per-example gradients.
2. Sum. The clipped sum ``sum_i w_i g_i`` of the ghost leaves is the
   gradient of the batch's loss in which each ghost use lets its leaf see
   the cotangent scaled by the example's weight ``w_i``
   (``y + w_i (z - stop_gradient(z))`` with ``z`` the use recomputed with
   the activations held constant: the value is unchanged, and the other
   derivatives are not weighted). Dropped examples (padding, non-finite)
   are replaced by a kept one with weight 0, so their NaN cannot leak.

References: Li et al., Large Language Models Can Be Strong Differentially
Private Learners, 2021; Bu et al., Differentially Private Optimization on
Large Model at Small Cost, 2023.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from optaxclip import _example_clip, _norms, _tree
from optaxclip._numerics import exponent, pow2

_WHERE = "clipped_grad(method='ghost')"
_HIGHEST = jax.lax.Precision.HIGHEST

# Single-operand linear maps that a leaf may pass through before its use.
_VIEWS = frozenset({"reshape", "transpose", "convert_element_type", "squeeze",
                    "broadcast_in_dim", "copy", "copy_p", "slice",
                    "expand_dims"})
# Primitives whose gradient in one operand (the leaf) needs only the other
# operands and the output cotangent.
_USES = frozenset({"dot_general", "conv_general_dilated", "gather", "mul",
                   "add", "sub"})
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})
_REMAT = frozenset({"remat2", "checkpoint", "remat"})


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
  new_args, rebuild = _example_clip.split_modules(args, tuple(grad_nums))
  for i in grad_nums:
    if i not in rebuild:
      for x in jax.tree_util.tree_leaves(args[i]):
        if not isinstance(x, (jax.Array, np.ndarray, np.generic, float)):
          raise TypeError(
              f"{_WHERE}: argument {i} must be an nnx.Module or a pytree of"
              " arrays (linen params, an Equinox module's arrays as"
              " eqx.partition gives them, the nnx.State of nnx.split); it"
              f" holds a {type(x).__name__}.")
  trees = [new_args[i] for i in grad_nums]
  leaves, treedef = jax.tree_util.tree_flatten(
      trees[0] if argnums_is_int else tuple(trees))
  if not leaves:
    raise ValueError(f"{_WHERE}: the differentiated arguments hold no"
                     " parameters.")
  leaves = [jnp.asarray(x) for x in leaves]
  model = _Model(fun, tuple(grad_nums), tuple(batch_nums), has_aux,
                 keep_batch_dim, kwargs, rebuild, treedef, argnums_is_int)
  return tuple(new_args), leaves, treedef, model.clip_chunk


# ----------------------------------------------------------------------------
# The traced loss and the two passes.


class _Model:
  """``fun`` as a function of the differentiated leaves and one example."""

  def __init__(self, fun, grad_nums, batch_nums, has_aux, keep_batch_dim,
               kwargs, rebuild, treedef, argnums_is_int):
    self.single = argnums_is_int
    self.fun, self.grad_nums, self.batch_nums = fun, grad_nums, batch_nums
    self.has_aux, self.keep_batch_dim = has_aux, keep_batch_dim
    self.kwargs, self.rebuild, self.treedef = kwargs, rebuild, treedef

  def trace(self, args, leaves):
    """One example's loss as a ``ClosedJaxpr`` of ``(*leaves, *example)``
    leaves, and the tree of its outputs."""
    example = [jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(
        jnp.shape(x)[1:], jnp.result_type(x)), args[i])
               for i in self.batch_nums]
    ex_leaves, ex_tree = jax.tree_util.tree_flatten(example)

    def single(leaves, ex_leaves):
      tree = jax.tree_util.tree_unflatten(self.treedef, leaves)
      trees = [tree] if self.single else list(tree)
      call = list(args)
      for i, t in zip(self.grad_nums, trees):
        call[i] = self.rebuild[i](t) if i in self.rebuild else t
      ex = jax.tree_util.tree_unflatten(ex_tree, ex_leaves)
      for i, x in zip(self.batch_nums, ex):
        call[i] = (jax.tree_util.tree_map(lambda v: jnp.expand_dims(v, 0), x)
                   if self.keep_batch_dim else x)
      return self.fun(*call, **self.kwargs)

    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    closed, out = jax.make_jaxpr(single, return_shape=True)(shapes,
                                                            ex_leaves)
    if self.has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"{_WHERE}: with has_aux=True, fun must return"
                        " (loss, aux).")
      loss = out[0]
    else:
      loss = out
    if (not isinstance(loss, jax.ShapeDtypeStruct) or loss.shape != ()
        or not jnp.issubdtype(loss.dtype, jnp.floating)):
      raise TypeError(
          f"{_WHERE}: fun must return one example's loss, a float scalar (it"
          f" sees one example at a time); got {loss}.")
    return closed, jax.tree_util.tree_structure(out)

  def clip_chunk(self, args, mask, threshold, *, per_layer, normalize,
                 nan_safe, caller, automatic=None):
    """The clipped sum over one chunk of examples, as ``_clip_sum`` returns."""
    leaves = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(
        [args[i] for i in self.grad_nums])]
    closed, out_tree = self.trace(args, leaves)
    found = _Analysis(closed.jaxpr, len(leaves))
    ghost = found.ghost_leaves()
    fallback = [j for j in range(len(leaves)) if j in found.bad
                or found.count.get(j, 0) > 1]
    batch = mask.shape[0]
    acc = _tree.common_acc_dtype(leaves)
    ex_leaves = jax.tree_util.tree_leaves([args[i] for i in self.batch_nums])
    like = _batch_sharding(ex_leaves)
    copies = [jnp.broadcast_to(leaves[j], (batch,) + leaves[j].shape,
                               out_sharding=like(leaves[j].ndim + 1))
              for j in fallback]
    uses = {k: u for k, u in found.uses.items() if u.leaf in ghost}
    tokens = {k: jnp.zeros((batch,) + u.loops, acc,
                           out_sharding=like(len(u.loops) + 1))
              for k, u in uses.items()}

    def interpret(run, mixed, ex):
      return run.eval(closed.jaxpr, closed.consts, list(mixed) + list(ex),
                      ())

    # Pass 1: norms (tokens) and the fallback leaves' per-example gradients.
    def one(copies, tokens, ex):
      mixed = list(leaves)
      for j, x in zip(fallback, copies):
        mixed[j] = x
      run = _Run(uses, "norms", tokens=tokens, acc=acc)
      outs = interpret(run, mixed, ex)
      return outs[0], outs[1:]

    def batched(copies, tokens):
      return jax.vmap(one)(copies, tokens, ex_leaves)

    loss, backward, aux_leaves = jax.vjp(batched, copies, tokens,
                                         has_aux=True)
    copy_grads, token_cts = backward(jnp.ones_like(loss))
    aux = (jax.tree_util.tree_unflatten(out_tree, [loss] + list(aux_leaves))[1]
           if self.has_aux else None)

    leaf_norms = [jnp.zeros((batch,), acc)] * len(leaves)
    if fallback:
      for j, n in zip(fallback, _norms.example_norms(copy_grads)[0]):
        leaf_norms[j] = n.astype(acc)
    per_leaf: dict[int, list[jax.Array]] = {}
    for k, u in uses.items():
      per_leaf.setdefault(u.leaf, []).append(
          token_cts[k].reshape(batch, -1))
    for j, parts in per_leaf.items():
      leaf_norms[j] = _norms.example_norms(
          [jnp.concatenate(parts, axis=1)])[1].astype(acc)
    norms = _norms.example_norms([jnp.stack(leaf_norms, axis=1)])[1]
    weights, keep, stats = _example_clip.clip_weights(
        leaf_norms, norms, self.treedef, threshold, per_layer=per_layer,
        normalize=normalize, nan_safe=nan_safe, mask=mask, caller=caller,
        automatic=automatic)
    stats = stats._replace(fell_back=jax.tree_util.tree_unflatten(
        self.treedef, [jnp.asarray(j in fallback) for j in range(
            len(leaves))]))

    sums: list[Any] = [None] * len(leaves)
    for j, g in zip(fallback, copy_grads):
      sums[j] = _example_clip.weighted_sum(g, weights[j], keep)
    summed = [j for j in range(len(leaves)) if j not in fallback]
    if summed:
      # Pass 2: the weighted sum of the ghost leaves' gradients, with every
      # dropped example replaced by a kept one (weight 0).
      first = jnp.arange(batch) == jnp.argmax(keep)
      ex2 = [_replace_dropped(x, keep, first) for x in ex_leaves]
      w = {j: weights[j].astype(acc) for j in ghost}

      def total(values, ex2, w):
        mixed = list(leaves)
        for j, x in zip(summed, values):
          mixed[j] = x

        def two(ex, w):
          run = _Run(uses, "sum", weights=w, acc=acc)
          return interpret(run, mixed, ex)[0]

        return jnp.sum(jax.vmap(two)(ex2, w))

      operands = ([leaves[j] for j in summed], ex2, w)
      if any(u.loops for u in uses.values()):
        # In a branch, so that XLA allocates this pass's stacked scan
        # residuals only once the first pass is done with its own (else
        # both passes' are allocated at once: 1.9x the non-private step's
        # memory, measured on the stacked NNX benchmark model).
        grads = jax.lax.cond(
            stats.num_examples >= 0, lambda o: jax.grad(total)(*o),
            lambda o: [jnp.zeros_like(v) for v in o[0]], operands)
      else:
        grads = jax.grad(total)(*operands)
      for j, g in zip(summed, grads):
        sums[j] = g.astype(_tree.acc_dtype(leaves[j].dtype))
    return sums, stats, aux


def _replace_dropped(x, keep, first):
  """``x`` with each example not in ``keep`` replaced by the example that
  ``first`` marks: selects and one sum, no gather across a split batch.
  Typed PRNG keys (one per example, for dropout) go through their data."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _replace_dropped(jax.random.key_data(x), keep, first)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  shape = lambda m: m.reshape((-1,) + (1,) * (x.ndim - 1))  # noqa: E731
  kept = jnp.sum(jnp.where(shape(first), x, jnp.zeros((), x.dtype)), axis=0,
                 dtype=x.dtype)
  return jnp.where(shape(keep), x, kept[None])


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


# ----------------------------------------------------------------------------
# Analysis: where each leaf enters the computation.


class _Ref(NamedTuple):
  """A value that is a leaf seen through linear views (``chain``, applied to
  a value shaped ``base``: the leaf, or one iteration's slice of it)."""
  leaf: int
  base: jax.ShapeDtypeStruct
  chain: tuple[Any, ...]
  iso: bool        # The views keep the norm of a gradient.
  repeated: bool   # Loop-invariant in a scan of several iterations.


class _Use(NamedTuple):
  leaf: int
  pos: int                   # The operand that is the leaf's view.
  loops: tuple[int, ...]     # Iterations of the enclosing scans.
  ref: _Ref
  fixed: bool                # No other operand depends on the example.


def _name(eqn) -> str:
  return eqn.primitive.name


def _is_literal(v) -> bool:
  return isinstance(v, jex.Literal)


def _aval(v) -> jax.ShapeDtypeStruct:
  a = v.aval
  return jax.ShapeDtypeStruct(tuple(a.shape), a.dtype)


def _keeps_norm(eqn) -> bool:
  """Whether a view's transpose keeps norms: all but a real broadcast."""
  if _name(eqn) != "broadcast_in_dim":
    return True
  return math.prod(eqn.invars[0].aval.shape) == math.prod(
      eqn.outvars[0].aval.shape)


class _Analysis:
  """Walks the jaxpr: every leaf's uses, by path of equation indices."""

  def __init__(self, jaxpr, num_leaves: int):
    self.uses: dict[tuple, _Use] = {}
    self.bad: set[int] = set()
    self.count: dict[int, int] = {}
    self.recording = True
    refs = [_Ref(j, _aval(v), (), True, False)
            for j, v in enumerate(jaxpr.invars[:num_leaves])]
    rest = len(jaxpr.invars) - num_leaves
    outs, _ = self.walk(jaxpr, refs + [None] * rest,
                        [False] * num_leaves + [True] * rest, (), ())
    self.spoil(outs)
    self.num_leaves = num_leaves

  def ghost_leaves(self) -> set[int]:
    return {j for j in range(self.num_leaves)
            if j not in self.bad and self.count.get(j, 0) <= 1}

  def spoil(self, refs):
    if self.recording:
      self.bad.update(r.leaf for r in refs if r is not None)

  def walk(self, jaxpr, refs_in, deps_in, path, loops):
    ref: dict[Any, _Ref | None] = {}
    dep: dict[Any, bool] = {}
    for v, r, d in zip(jaxpr.invars, refs_in, deps_in):
      ref[v], dep[v] = r, d
    read_ref = lambda v: None if _is_literal(v) else ref.get(v)  # noqa: E731
    read_dep = lambda v: False if _is_literal(v) else dep.get(v, False)  # noqa: E731
    for k, eqn in enumerate(jaxpr.eqns):
      key = path + (k,)
      refs = [read_ref(v) for v in eqn.invars]
      deps = [read_dep(v) for v in eqn.invars]
      outs_ref: list[_Ref | None] = [None] * len(eqn.outvars)
      outs_dep = [any(deps)] * len(eqn.outvars)
      name = _name(eqn)
      if not any(r is not None for r in refs):
        pass
      elif name in _VIEWS and len(eqn.invars) == 1:
        r = refs[0]
        assert r is not None
        outs_ref = [r._replace(chain=r.chain + (eqn,),
                               iso=r.iso and _keeps_norm(eqn))]
      elif name in _USES and self.use_ok(eqn, refs, deps):
        pos = next(i for i, r in enumerate(refs) if r is not None)
        r = refs[pos]
        assert r is not None
        if self.recording:
          fixed = not any(d for i, d in enumerate(deps) if i != pos)
          self.uses[key] = _Use(r.leaf, pos, loops, r, fixed)
          self.count[r.leaf] = self.count.get(r.leaf, 0) + (
              2 if r.repeated else 1)
        outs_dep = [True] * len(eqn.outvars)
      elif name in _CALLS:
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        inner = getattr(inner, "jaxpr", inner)
        outs_ref, outs_dep = self.walk(inner, refs, deps, key, loops)
      elif name in _REMAT:
        outs_ref, outs_dep = self.walk(eqn.params["jaxpr"], refs, deps, key,
                                       loops)
      elif name == "scan":
        outs_ref, outs_dep = self.scan(eqn, refs, deps, key, loops)
      else:
        self.spoil(refs)
      for v, r, d in zip(eqn.outvars, outs_ref, outs_dep):
        ref[v], dep[v] = r, d
    return ([read_ref(v) for v in jaxpr.outvars],
            [read_dep(v) for v in jaxpr.outvars])

  def use_ok(self, eqn, refs, deps) -> bool:
    """One operand is a leaf's view, used once in this equation, and
    another depends on the example (so the output is per example)."""
    found = [i for i, r in enumerate(refs) if r is not None]
    if len(found) != 1 or refs[found[0]].repeated:
      return False
    pos = found[0]
    if _name(eqn) == "gather" and pos != 0:
      return False
    if _name(eqn) == "conv_general_dilated" and pos != 1:
      return False
    if not jnp.issubdtype(eqn.invars[pos].aval.dtype, jnp.inexact):
      return False
    # A lookup at fixed ids (a position table) is made per example below.
    return _name(eqn) == "gather" or any(
        d for i, d in enumerate(deps) if i != pos)

  def scan(self, eqn, refs, deps, key, loops):
    p = eqn.params
    nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
    body = p["jaxpr"]
    inner: list[_Ref | None] = []
    for i, r in enumerate(refs):
      if r is None:
        inner.append(None)
      elif i < nc:
        inner.append(r._replace(repeated=r.repeated or length > 1))
      elif i < nc + nk or not r.iso:
        self.spoil([r])
        inner.append(None)
      else:  # Scanned over: one slice per iteration, each a leaf of its own.
        shape = _aval(eqn.invars[i])
        inner.append(_Ref(r.leaf, jax.ShapeDtypeStruct(shape.shape[1:],
                                                       shape.dtype),
                          (), True, r.repeated))
    carry = list(deps[nc:nc + nk])
    recording, self.recording = self.recording, False
    try:
      for _ in range(nk + 1):  # Which carries depend on the example.
        ins = list(deps[:nc]) + carry + list(deps[nc + nk:])
        _, out_dep = self.walk(body.jaxpr, inner, ins, key, loops)
        new = [a or b for a, b in zip(carry, out_dep[:nk])]
        if new == carry:
          break
        carry = new
    finally:
      self.recording = recording
    ins = list(deps[:nc]) + carry + list(deps[nc + nk:])
    out_ref, out_dep = self.walk(body.jaxpr, inner, ins, key,
                                 loops + (length,))
    # A slice passed through to the stacked outputs (nnx.scan returns the
    # state it scanned over) is the leaf again; any other leaf is spoiled.
    outer: list[_Ref | None] = [None] * len(out_ref)
    for k, r in enumerate(out_ref):
      same = [i for i in range(nc + nk, len(inner)) if inner[i] is r]
      if r is not None and k >= nk and same:
        outer[k] = refs[same[0]]
      else:
        self.spoil([r])
    return outer, carry + list(out_dep[nk:])


# ----------------------------------------------------------------------------
# Interpretation: the jaxpr run again, its ghost uses replaced.


def _bind(eqn, invals):
  bound = eqn.primitive.get_bind_params(eqn.params)
  # JAX 0.8 returns (subfunctions, params); later versions the params.
  subfuns, params = ([], bound) if isinstance(bound, dict) else bound
  out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


class _Run:
  """One interpretation of the jaxpr: ``"norms"`` (ghost uses as
  ``custom_vjp`` calls whose tokens' cotangents are the norms) or ``"sum"``
  (each ghost use's leaf sees the cotangent times its example's weight)."""

  def __init__(self, uses, mode, *, tokens=None, weights=None, acc):
    self.uses, self.mode, self.acc = uses, mode, acc
    self.tokens = dict(tokens or {})
    self.weights = weights or {}
    self.under = {k[:n] for k in uses for n in range(1, len(k))}

  def eval(self, jaxpr, consts, args, path):
    env: dict[Any, Any] = {}
    read = lambda v: v.val if _is_literal(v) else env[v]  # noqa: E731
    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x in zip(jaxpr.invars, args):
      env[v] = x
    for k, eqn in enumerate(jaxpr.eqns):
      key = path + (k,)
      invals = [read(v) for v in eqn.invars]
      if key in self.uses:
        outs = [self.use(key, eqn, invals)]
      elif key in self.under or _name(eqn) in _CALLS:
        # Calls are inlined: their recorded context (mesh) is one example's.
        outs = self.nested(key, eqn, invals)
      else:
        outs = _bind(eqn, invals)
      for v, x in zip(eqn.outvars, outs):
        env[v] = x
    return [read(v) for v in jaxpr.outvars]

  def scoped(self, key):
    return {k: v for k, v in self.tokens.items() if k[:len(key)] == key}

  def within(self, tokens, fn):
    saved = self.tokens
    self.tokens = {**saved, **tokens}
    try:
      return fn()
    finally:
      self.tokens = saved

  def nested(self, key, eqn, invals):
    name = _name(eqn)
    if name in _CALLS:
      inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      consts = getattr(inner, "consts", [])
      return self.eval(getattr(inner, "jaxpr", inner), consts, invals, key)
    if name in _REMAT:
      p = eqn.params
      inner = p["jaxpr"]

      def block(args, tokens):
        return self.within(tokens, lambda: self.eval(inner, [], args, key))

      return list(jax.checkpoint(block, prevent_cse=p["prevent_cse"],
                                 policy=p["policy"])(invals,
                                                     self.scoped(key)))
    assert name == "scan", name
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    body = p["jaxpr"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]

    def step(carry, x):
      xs, tokens = x
      outs = self.within(tokens, lambda: self.eval(
          body.jaxpr, body.consts, list(consts) + list(carry) + list(xs),
          key))
      return outs[:nk], outs[nk:]

    carry, ys = jax.lax.scan(step, list(init), (list(xs), self.scoped(key)),
                             length=p["length"], reverse=p["reverse"],
                             unroll=p["unroll"])
    return list(carry) + list(ys)

  def use(self, key, eqn, invals):
    u = self.uses[key]
    apply = functools.partial(_apply, eqn)
    if self.mode == "sum":
      held = [x if i == u.pos else jax.lax.stop_gradient(x)
              for i, x in enumerate(invals)]
      free = list(invals)
      free[u.pos] = jax.lax.stop_gradient(invals[u.pos])
      y = apply(free)
      z = apply(held)
      w = self.weights[u.leaf].astype(z.dtype)
      return y + w * (z - jax.lax.stop_gradient(z))
    return _ghost_call(eqn, u, self.tokens[key], invals, self.acc)


def _apply(eqn, ops):
  return _bind(eqn, ops)[0]


def _ghost_call(eqn, u: _Use, token, invals, acc):
  """``eqn`` on ``invals``, whose backward rule returns the example's norm
  of the leaf's gradient as ``token``'s cotangent."""
  apply = functools.partial(_apply, eqn)
  floats = [i for i, x in enumerate(invals) if i != u.pos
            and jnp.issubdtype(jnp.result_type(x), jnp.inexact)]

  def run(token, ops):
    # Per example, even where no operand depends on the example.
    y = apply(ops)
    return y + (token * 0).astype(y.dtype) if u.fixed else y

  @jax.custom_vjp
  def call(token, ops):
    return run(token, ops)

  def fwd(token, ops):
    return run(token, ops), ops

  def bwd(ops, dy):
    cts: list[Any] = [None] * len(ops)
    if floats:
      def part(*fs):
        full = list(ops)
        for i, f in zip(floats, fs):
          full[i] = f
        return apply(full)
      _, vjp = jax.vjp(part, *[ops[i] for i in floats])
      for i, g in zip(floats, vjp(dy)):
        cts[i] = g
    norm = _use_norm(eqn, ops, u, dy, acc)
    return jnp.broadcast_to(norm.astype(acc), jnp.shape(token)), cts

  call.defvjp(fwd, bwd)
  return call(token, [jnp.asarray(x) for x in invals])


# ----------------------------------------------------------------------------
# One example's norm of a leaf's gradient at one use.


def _use_norm(eqn, ops, u: _Use, dy, acc) -> jax.Array:
  if u.ref.iso:
    if _name(eqn) == "dot_general":
      n = _dot_norm(eqn.params, ops, u.pos, dy, acc)
      if n is not None:
        return n
    if _name(eqn) == "gather":
      n = _gather_norm(eqn.params, ops, dy, acc)
      if n is not None:
        return n

  def at(v):
    full = list(ops)
    full[u.pos] = v
    return _apply(eqn, full)

  g = jax.vjp(at, ops[u.pos])[1](dy)[0]
  if not u.ref.iso:
    chain = u.ref.chain

    def view(w):
      for e in chain:
        w = _bind(e, [w])[0]
      return w

    g = jax.linear_transpose(view, u.ref.base)(g)[0]
  return _norms.example_norms([g[None]])[1][0].astype(acc)


def _scaled(x, acc):
  """``x`` in ``acc`` divided by the power of two ``2**e`` just above its
  largest entry, and ``e``."""
  x = x.astype(acc)
  e = exponent(jnp.max(jnp.abs(x), initial=0))
  return x * pow2(-e, acc), e


def _dot_norm(params, ops, pos, dy, acc):
  """``||x^T dy||`` for a ``dot_general`` whose operand ``pos`` is the
  leaf, in Gram form or directly, whichever costs fewer operations."""
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  if lb or rb:
    return None
  x, w = ops[1 - pos], ops[pos]
  xc = tuple(lc if pos == 1 else rc)
  wf = [d for d in range(w.ndim) if d not in (rc if pos == 1 else lc)]
  xf = [d for d in range(x.ndim) if d not in xc]
  t = math.prod(x.shape[d] for d in xf)
  c = math.prod(x.shape[d] for d in xc)
  f = math.prod(w.shape[d] for d in wf)
  rows = jnp.transpose(x, xf + list(xc)).reshape(t, c)
  cols = dy.reshape(t, f) if pos == 1 else dy.reshape(f, t).T
  rows, ea = _scaled(rows, acc)
  cols, ec = _scaled(cols, acc)
  if _use_gram(t, c, f):
    sq = jnp.sum(jnp.matmul(rows, rows.T, precision=_HIGHEST)
                 * jnp.matmul(cols, cols.T, precision=_HIGHEST))
  else:
    sq = jnp.sum(jnp.square(jnp.matmul(rows.T, cols, precision=_HIGHEST)))
  return jnp.sqrt(jnp.maximum(sq, 0)) * pow2(ea, acc) * pow2(ec, acc)


def _use_gram(t: int, c: int, f: int) -> bool:
  """Gram form (``T^2 (C + F)`` operations) or the product ``x^T dy``
  (``T C F``), for ``T`` rows of ``C`` inputs and ``F`` outputs."""
  return t * t * (c + f) <= t * c * f


def _use_gram_ids(t: int, size: int) -> bool:
  """Gram form over ``T`` ids (``T^2`` per feature) or the scatter into a
  table of ``size`` rows."""
  return t * t <= size


def _gather_norm(params, ops, dy, acc):
  """The norm of an embedding lookup's table gradient: Gram form over the
  token ids (``[id_t = id_s] dy_t . dy_s``) or the scatter of ``dy`` into
  the table, whichever is smaller."""
  table, ids = ops[0], ops[1]
  dn = params["dimension_numbers"]
  if (table.ndim != 2 or tuple(dn.collapsed_slice_dims) != (0,)
      or tuple(dn.start_index_map) != (0,)
      or tuple(getattr(dn, "operand_batching_dims", ())) != ()
      or tuple(params["slice_sizes"]) != (1, table.shape[1])
      or tuple(dn.offset_dims) != (dy.ndim - 1,) or ids.shape[-1] != 1):
    return None
  size, width = table.shape
  ids = ids.reshape(-1)
  t = ids.shape[0]
  if params["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP:
    valid = (ids >= 0) & (ids < size)
  else:
    valid = jnp.ones(ids.shape, bool)
  ids = jnp.clip(ids, 0, size - 1)
  cols, e = _scaled(dy.reshape(t, width), acc)
  cols = jnp.where(valid[:, None], cols, 0)
  if _use_gram_ids(t, size):
    same = (ids[:, None] == ids[None, :]).astype(acc)
    sq = jnp.sum(same * jnp.matmul(cols, cols.T, precision=_HIGHEST))
  else:
    sq = jnp.sum(jnp.square(jax.ops.segment_sum(cols, ids,
                                                num_segments=size)))
  return jnp.sqrt(jnp.maximum(sq, 0)) * pow2(e, acc)

"""QK-Clip (Kimi K2): rescale query and key weights whose attention logits grow.

:func:`qk_clip` is the last link of an optimizer chain; it reads each
attention head's largest pre-softmax logit of the step (an extra argument of
``update``) and shrinks that head's query and key projections so that its
logits shrink by ``max_logit / S_max``, in multi-head, grouped-query, latent
(MLA) and fused ``qkv`` layouts (:class:`QKLayout`).
:func:`max_logit_attention` records those logits in a Flax NNX
``nnx.MultiHeadAttention`` or an attention module of one's own;
:func:`gather_max_logits` collects them into the tree :func:`qk_clip` reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _stats, _thresholds, _transform, _tree, _validate
from optaxclip._norms import AxisName
from optaxclip._stats import ClipStats
from optaxclip._thresholds import Threshold

_WHERE = "qk_clip"
_SOWN = "max_logits"  # The name max_logit_attention sows under.
_HOW = (" Record them with nnx.MultiHeadAttention(...,"
        " attention_fn=oc.max_logit_attention), call the attention with"
        " sow_weights=True inside nnx.capture(..., nnx.Intermediate), and pass"
        " oc.gather_max_logits(intermediates).")


class QKLayout(NamedTuple):
  """Where an attention module keeps its query and key projections.

  Every leaf below a projection's path (kernel, bias) is scaled. Its axis
  ``head_axis`` and the axes after it are the projection's outputs: read in
  order (row-major), they hold one head after another, each head's entries
  together, so ``(in, heads, head_dim)`` kernels, ``(heads, head_dim)``
  biases and flat ``(in, heads * head_dim)`` kernels (``head_axis=-1``) all
  fit, with or without leading layer axes.

  Attributes:
    query_path: the path of the query projection inside the attention module,
      ``/``-separated (``"query"`` for ``nnx.MultiHeadAttention`` and linen's
      ``MultiHeadDotProductAttention``); with ``fused``, the path of the
      fused projection.
    key_path: the same for the key projection (not read with ``fused``).
    head_axis: the first output axis of the projections' leaves: ``-2`` for
      ``LinearGeneral`` kernels ``(in_features, heads, head_dim)`` and their
      biases ``(heads, head_dim)``.
    kv_heads: grouped-query attention: how many key heads, each shared by
      ``heads // kv_heads`` consecutive query heads. ``None``: for separate
      projections, read from the leaves, key heads being as wide as query
      heads (``heads`` times the key's outputs over the query's); for
      ``fused`` and ``nope_dim`` layouts, ``heads``.
    nope_dim: multi-head latent attention (MLA): how many leading entries
      of each query and key head are its own part without rotary embedding
      (Kimi K2's ``q^C`` and ``k^C``, DeepSeek's ``qk_nope_head_dim``). The
      rest of a query head is its rotary part ``q^R``, scaled by the whole
      factor; the rest of a key head is its value (MLA's up-projection of
      the latent gives both), untouched. The rotary key ``k^R``, shared by
      the heads, is in no projection named here and is left alone.
      ``None``: no such split.
    fused: one projection at ``query_path`` gives the query, key and value
      heads: ``"qkv"`` for all query heads, then all key heads, then all
      value heads (nanoGPT's ``c_attn``, MaxText's fused ``(3, heads,
      head_dim)`` kernel); ``"grouped"`` for, per key head, its group's
      query heads, then the key, then the value (Megatron-LM's
      ``linear_qkv``; GPT-NeoX's ``query_key_value`` with one query head per
      key). ``None``: separate projections.
  """

  query_path: str = "query"
  key_path: str = "key"
  head_axis: int = -2
  kv_heads: int | None = None
  nope_dim: int | None = None
  fused: str | None = None


_MHA = QKLayout()  # nnx.MultiHeadAttention's layout.
_FUSED = (None, "qkv", "grouped")


@_stats.named("qk_clip")
class QKClipState(NamedTuple):
  """State of :func:`qk_clip`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`, in float32: ``threshold`` is
      ``max_logit`` in force at the last update (``inf`` when a run-time
      value was not positive: nothing was clipped); ``scale`` the smallest
      factor ``gamma = min(1, max_logit / S_max)`` over the heads of the
      last step (1 when none was clipped); ``clipped`` whether any head
      was clipped; ``frac_clipped`` the fraction of heads clipped (query
      heads: under grouped-query attention, every head of a clipped
      group).
      ``norm`` is ``None``: the rule reads logits, not the update.
    largest_logit: the largest per-head max logit ``S_max`` of the last
      step, over every head (NaN heads left out; ``-inf`` when all were
      NaN).
    num_heads_clipped: how many query heads were scaled at the last update
      (int32).
    num_nonfinite: how many heads had a NaN or ``+inf`` max logit at the last
      update; their logits set no factor (int32).
  """

  stats: ClipStats
  largest_logit: jax.Array
  num_heads_clipped: jax.Array
  num_nonfinite: jax.Array


@_validate.renamed(tau="max_logit", alpha="query_exponent")
def qk_clip(
    max_logit: Threshold = 100.0, *,
    query_exponent: float | jax.Array = 0.5,
    layout: QKLayout | Mapping[str, QKLayout] = _MHA,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Shrinks the query and key weights of heads whose logits exceed ``max_logit``.

  The QK-Clip of Kimi K2's MuonClip. For each attention head ``h``, with
  ``S_max[h]`` the largest pre-softmax logit of the step (over the batch,
  the query and the key positions), ``gamma[h] = min(1, max_logit /
  S_max[h])``; after the update, that head's query projection is
  multiplied by ``gamma**query_exponent`` and its key projection by
  ``gamma**(1 - query_exponent)``, so that every logit ``q . k`` of the
  head shrinks by ``gamma`` against the unclipped update's: the step's
  largest logit would land on ``max_logit`` but for the update's own
  change of the weights (exactly on it with a zero update), as in Kimi K2,
  where ``S_max`` also comes from the forward pass before the update.
  Biases of the projections are scaled as the same head's kernel: the
  logit is bilinear in ``(W_q x + b_q)`` and ``(W_k x + b_k)``, so it
  still shrinks by exactly ``gamma``. Heads with ``S_max <= max_logit``
  are untouched, bit for bit.

  The layouts (:class:`QKLayout`): separate query and key projections (the
  default, ``nnx.MultiHeadAttention``'s); **grouped-query attention**,
  where ``kv_heads`` key heads each serve ``heads // kv_heads`` consecutive
  query heads: the key's factor is one number, so the group shares one,
  ``gamma[g] = min(1, max_logit / max_{h in g} S_max[h])`` from the
  group's largest logit (Megatron-LM's ``clip_qk``), its query heads
  scaled by ``gamma[g]**query_exponent`` and its key by
  ``gamma[g]**(1 - query_exponent)``: every logit of the group shrinks by
  ``gamma[g]``, the group's largest lands on ``max_logit``, and no weight
  grows (giving each query head its own factor against the shared key's
  would grow the queries of the group's heads below the cap, step after
  step); **multi-head latent attention** (``nope_dim``), Kimi K2's own
  case: each head's ``q^C`` scaled by ``gamma**query_exponent``, ``k^C`` by
  ``gamma**(1 - query_exponent)``, the rotary ``q^R`` by ``gamma`` and the
  shared rotary key ``k^R`` left alone, so every logit ``q^C . k^C + q^R .
  k^R`` still shrinks by ``gamma``; **fused** ``qkv`` projections
  (``fused``), in either order of their outputs, with the value heads
  untouched.

  It must be the **last** link of the chain: given the update ``u`` and
  the parameters ``W``, it returns ``gamma' * (W + u) - W`` for the query
  and key leaves of the clipped heads (``gamma'`` their factor) and ``u``
  elsewhere, so that ``optax.apply_updates`` lands on the clipped weights.

  ``update`` takes the step's logits as ``max_logits=``: a pytree whose
  leaves are arrays of shape ``(heads,)``, or ``(layers, heads)`` for
  layers stacked by ``nnx.vmap`` (kernels ``(layers, in, heads, dim)``),
  each leaf's path naming an attention module in ``params``: nested like
  the parameters, or a flat dict such as ``{"blocks/0/attn": s}`` (what
  :func:`gather_max_logits` returns). ``optax.chain`` and
  ``nnx.Optimizer.update(model, grads, max_logits=...)`` forward it.

  Edge cases: ``S_max`` of 0, negative or ``-inf`` is below ``max_logit``
  (no clip); a NaN or ``+inf`` ``S_max`` leaves its head untouched (a
  factor of 0 would zero the query and key for good: their gradients
  vanish together; under grouped-query attention the head still takes its
  group's factor) and is counted in ``num_nonfinite``; pair with
  :func:`optaxclip.skip_step` to skip such steps. ``max_logit = inf``
  clips nothing; a ``max_logit`` arriving at run time (a schedule) that
  is 0, negative or NaN clips nothing either. Leaves in no attention
  module are untouched. A leaf whose outputs do not split into the
  layout's heads raises an error naming the leaf and its shape.

  Args:
    max_logit: Kimi K2's ``tau``, the largest logit allowed, > 0 (``inf``
      disables): a number, JAX scalar or Optax schedule of the step count.
    query_exponent: Kimi K2's ``alpha``, the share of the factor given to
      the query (the key gets ``1 - query_exponent``; an MLA head's rotary
      query the whole factor), in ``[0, 1]``.
    layout: where each attention module keeps its query and key, and how
      its heads are laid out (grouped, latent, fused): one
      :class:`QKLayout` for all, or a mapping from module paths (as in
      ``max_logits``) to layouts, others taking the default.
    axis_name: inside ``shard_map``/``pmap`` with the batch split across
      devices, the mesh axis (or axes) of that split: each device's
      ``max_logits`` are then its own examples' and are reduced with
      ``lax.pmax``, so every device clips by the batch's largest logits.
      Not the axis of heads split across devices (tensor parallelism),
      whose devices hold different heads. Plain ``jax.jit`` on sharded
      arrays needs none: ``max_logits`` is then the batch's already.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`QKClipState`. Its ``update`` needs ``params`` and
    ``max_logits``.

  References:
    Kimi Team, `Kimi K2: Open Agentic Intelligence
    <https://arxiv.org/abs/2507.20534>`_, 2025 (Algorithm 1, MuonClip).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> params = {"attn": {"query": {"kernel": jnp.ones((1, 2, 1))},
    ...                    "key": {"kernel": jnp.ones((1, 2, 1))}}}
    >>> tx = optax.chain(optax.sgd(0.0), oc.qk_clip(100.0))
    >>> state = tx.init(params)
    >>> u, state = tx.update(params, state, params,
    ...                      max_logits={"attn": jnp.array([400.0, 50.0])})
    >>> new = optax.apply_updates(params, u)
    >>> print(new["attn"]["query"]["kernel"][0, :, 0])  # gamma**0.5 = 0.5, 1
    [0.5 1. ]
    >>> print(oc.clip_stats(state)["qk_clip/num_heads_clipped"])
    1
  """
  _validate.check_threshold(max_logit, "max_logit", _WHERE)
  if not _validate.is_schedule(max_logit) and _validate.is_concrete(
      max_logit) and not float(np.asarray(max_logit)) > 0:
    raise ValueError(
        f"{_WHERE}: max_logit={float(np.asarray(max_logit))} must be > 0"
        " (the largest logit allowed; inf disables clipping).")
  _validate.check_range(query_exponent, "query_exponent", _WHERE, lo=0.0,
                        hi=1.0, schedule=False)
  _check_layout(layout)

  def init_fn(params):
    del params
    return QKClipState(
        stats=_stats.fresh(jnp.float32, norm=False, frac=True,
                           threshold=jnp.zeros((), jnp.float32)),
        largest_logit=jnp.full((), -jnp.inf, jnp.float32),
        num_heads_clipped=jnp.zeros((), jnp.int32),
        num_nonfinite=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, max_logits=None, **extra):
    del extra  # Meant for other links of the chain.
    if params is None:
      raise ValueError(f"{_WHERE} needs params: call update(updates, state,"
                       " params, max_logits=...).")
    heads = _heads(max_logits)
    if axis_name is not None:
      heads = [(n, jax.lax.pmax(x, axis_name)) for n, x in heads]
    count = state.stats.count
    t = _thresholds.resolve(max_logit, count, jnp.float32, lo=0.0, nan=0.0)
    t = jnp.where(t > 0, t, jnp.inf)
    a = _thresholds.resolve(query_exponent, count, jnp.float32, lo=0.0,
                            hi=1.0, nan=0.5)
    gammas = [_gamma(s, t) for _, s in heads]
    out, factors = _scale_heads(updates, params, heads, gammas, a, layout)
    s = jnp.concatenate([s.reshape(-1) for _, s in heads])
    g = jnp.concatenate([g.reshape(-1) for g in factors])
    n = jnp.sum(g < 1, dtype=jnp.int32)
    return out, QKClipState(
        stats=_stats.advance(state.stats, clipped=n > 0, num=n, of=g.size,
                             threshold=t,
                             scale=jnp.min(g).astype(jnp.float32)),
        largest_logit=jnp.max(jnp.where(jnp.isnan(s), -jnp.inf, s)).astype(
            jnp.float32),
        num_heads_clipped=n,
        num_nonfinite=jnp.sum(jnp.isnan(s) | (s == jnp.inf), dtype=jnp.int32))

  return _transform.transformation(init_fn, update_fn, extra_args=True)


def _check_layout(layout: Any) -> None:
  layouts = list(layout.values()) if isinstance(layout, Mapping) else [layout]
  for one in layouts:
    if not isinstance(one, QKLayout):
      raise TypeError(
          f"{_WHERE}: layout must be an oc.QKLayout or a mapping from"
          f" attention module paths to oc.QKLayout; got {one!r}.")
    if not (isinstance(one.query_path, str) and isinstance(one.key_path, str)
            and isinstance(one.head_axis, int)
            and not isinstance(one.head_axis, bool)):
      raise TypeError(
          f"{_WHERE}: layout {one!r} must name query_path and key_path by a"
          " '/'-separated path (a string) and head_axis by an int.")
    for field in ("kv_heads", "nope_dim"):
      n = getattr(one, field)
      if n is not None and (not isinstance(n, int) or isinstance(n, bool)
                            or n < 1):
        raise ValueError(f"{_WHERE}: layout {field}={n!r} must be None or a"
                         " positive int.")
    if one.fused not in _FUSED:
      raise ValueError(
          f"{_WHERE}: layout fused={one.fused!r} must be None, 'qkv' (all"
          " query heads, then the keys, then the values) or 'grouped' (per"
          " key head: its query heads, the key, the value).")
    if one.fused and one.nope_dim is not None:
      raise ValueError(
          f"{_WHERE}: layout {one!r} sets both fused and nope_dim; MLA's"
          " projections are not fused with the value: give one of them.")


def _heads(max_logits: Any) -> list[tuple[str, jax.Array]]:
  """``(module path, S_max as float32)`` for each leaf of ``max_logits``."""
  if max_logits is None:
    raise ValueError(f"{_WHERE}: update needs the step's per-head max logits:"
                     " call update(updates, state, params, max_logits=...)."
                     + _HOW)
  leaves = jax.tree_util.tree_flatten_with_path(max_logits)[0]
  if not leaves:
    raise ValueError(f"{_WHERE}: max_logits holds no array." + _HOW)
  out = []
  for path, s in leaves:
    name = _path(path)
    s = jnp.asarray(s)
    if not jnp.issubdtype(s.dtype, jnp.floating) or s.ndim == 0:
      raise TypeError(
          f"{_WHERE}: max_logits at {name or 'the root'} must be a float"
          f" array of shape (heads,) or (layers, heads); got {s.dtype}"
          f" {s.shape}.")
    out.append((name, jax.lax.stop_gradient(s).astype(
        _tree.acc_dtype(s.dtype))))
  return out


def _gamma(s: jax.Array, t: jax.Array) -> jax.Array:
  """``min(1, t / s)`` per head; 1 where ``s`` is NaN or infinite."""
  over = jnp.isfinite(s) & (s > t.astype(s.dtype))
  return jnp.where(over, t.astype(s.dtype) / jnp.where(over, s, 1), 1)


def _path(path: Any) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _join(prefix: str, name: str) -> str:
  return f"{prefix}/{name}" if prefix else name


def _scale_heads(updates: Any, params: Any, heads: list[tuple[str, Any]],
                 gammas: list[jax.Array], query_exponent: jax.Array,
                 layout: Any) -> tuple[Any, list[jax.Array]]:
  """``updates`` with the query and key leaves of each module rescaled, and
  the factor each query head's logits were multiplied by."""
  leaves, rebuild = _tree.live_leaves(updates, _WHERE)
  weights = _param_leaves(updates, params)
  names = [_path(path) for path, _ in leaves]
  factors: dict[int, tuple[str, jax.Array]] = {}
  per_head = []
  for (module, s), gamma in zip(heads, gammas):
    one = layout.get(module, _MHA) if isinstance(layout, Mapping) \
        else layout
    roles = ((("qkv", one.query_path),) if one.fused else
             (("query", one.query_path), ("key", one.key_path)))
    found = {role: _under(names, module, part) for role, part in roles}
    kv = _kv_heads(one, s.shape[-1], found, leaves, names)
    group = _group_gamma(gamma, kv)  # (layers..., kv_heads)
    blocks = _block_factors(one, group, query_exponent, s.shape[-1] // kv)
    per_head.append(jnp.repeat(group, s.shape[-1] // kv, axis=-1))
    for role, found_leaves in found.items():
      for i in found_leaves:
        if i in factors:
          raise ValueError(
              f"{_WHERE}: the leaf {names[i]!r} is the query or key of two"
              f" attention modules ({factors[i][0]!r} and {module!r}).")
        factors[i] = (module, _broadcast(names[i], leaves[i][1], s.shape,
                                         *blocks[role], one))
  out = [g for _, g in leaves]
  for i, (_, f) in factors.items():
    out[i] = _clipped_update(out[i], weights[i], f)
  return rebuild(out), per_head


def _under(names: list[str], module: str, part: str) -> list[int]:
  """The indices of the leaves under ``module/part``; raises if none."""
  prefix = _join(module, part)
  found = [i for i, n in enumerate(names)
           if n == prefix or n.startswith(prefix + "/")]
  if not found:
    raise ValueError(
        f"{_WHERE}: max_logits names the attention module"
        f" {module or 'at the root'!r}, but the updates hold no leaf"
        f" under {prefix!r}. Pass max_logits keyed by the path of each"
        " attention module in params, or give layout=oc.QKLayout(...)"
        " naming its query and key.")
  return found


def _outputs(name: str, x: Any, head_axis: int) -> int:
  """How many entries a leaf's output axes (``head_axis`` on) hold."""
  if not -x.ndim <= head_axis < x.ndim:
    raise ValueError(
        f"{_WHERE}: the leaf {name!r} of shape {x.shape} has no axis"
        f" {head_axis}. Give layout=oc.QKLayout(head_axis=...), the first"
        " axis of the projection's outputs.")
  return math.prod(x.shape[head_axis % x.ndim:])


def _kv_heads(layout: QKLayout, heads: int, found: dict[str, list[int]],
              leaves: list[Any], names: list[str]) -> int:
  """How many key heads the module has; raises if they cannot share the
  ``heads`` query heads evenly."""
  kv = layout.kv_heads
  if kv is None and (layout.fused or layout.nope_dim is not None):
    kv = heads
  if kv is None:  # Key heads as wide as query heads: the leaves' sizes say.
    q, k = found["query"][0], found["key"][0]
    nq = _outputs(names[q], leaves[q][1], layout.head_axis)
    nk = _outputs(names[k], leaves[k][1], layout.head_axis)
    kv = nk * heads // nq if nq and (nk * heads) % nq == 0 else 0
    where = (f" (the key {names[k]!r} holds {nk} outputs, the query"
             f" {names[q]!r} {nq})")
  else:
    where = ""
  if not kv or heads % kv:
    raise ValueError(
        f"{_WHERE}: the key heads{where} cannot be shared evenly by the"
        f" {heads} query heads of max_logits (kv_heads={kv or None}). Give"
        " layout=oc.QKLayout(kv_heads=..., head_axis=...) for this layout.")
  return kv


def _group_gamma(gamma: jax.Array, kv: int) -> jax.Array:
  """Each key head's factor: the smallest of its query heads' (the group's
  largest logit decides, as in Megatron-LM's ``clip_qk``)."""
  return jnp.min(gamma.reshape(*gamma.shape[:-1], kv, -1), axis=-1)


def _block_factors(layout: QKLayout, group: jax.Array, a: jax.Array,
                   size: int) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Per role, the factors of each head block of its outputs: of a block's
  first ``nope_dim`` entries (all of them without ``nope_dim``), and of the
  rest. ``size`` query heads share each key head."""
  query = jnp.repeat(group, size, axis=-1)  # (layers..., heads)
  q, k, ones = query ** a, group ** (1 - a), jnp.ones_like(group)
  if layout.fused is None:
    return {"query": (q, query), "key": (k, ones)}
  if layout.fused == "qkv":
    fused = jnp.concatenate([q, k, ones], axis=-1)
  else:  # "grouped": each key head's query heads, its key, its value.
    fused = jnp.concatenate(
        [q.reshape(*group.shape, size), k[..., None], ones[..., None]],
        axis=-1).reshape(*group.shape[:-1], -1)
  return {"qkv": (fused, fused)}


def _param_leaves(updates: Any, params: Any) -> list[Any]:
  """The parameter of each live leaf of ``updates``, in order."""
  treedef = jax.tree_util.tree_structure(updates, is_leaf=_tree.is_masked)
  try:
    flat = treedef.flatten_up_to(params)  # type: ignore[attr-defined]
  except (ValueError, TypeError) as e:
    raise ValueError(f"{_WHERE}: params do not have the structure of the"
                     " updates; pass the parameters the updates are for."
                     ) from e
  return [w for w, u in zip(flat, treedef.flatten_up_to(updates))  # type: ignore[attr-defined]
          if not _tree.is_masked(u)]


def _broadcast(name: str, x: jax.Array, shape: tuple[int, ...],
               first: jax.Array, rest: jax.Array,
               layout: QKLayout) -> jax.Array:
  """The factor of each entry of ``x``, from the factors of its head blocks
  (``first`` for a block's first ``nope_dim`` entries, ``rest`` after)."""
  lead, blocks = len(shape) - 1, first.shape[-1]
  axis = layout.head_axis % x.ndim if -x.ndim <= layout.head_axis < x.ndim \
      else None
  size = math.prod(x.shape[axis:]) if axis is not None else 0
  if axis is None or axis < lead or x.shape[:lead] != shape[:-1] or (
      size % blocks):
    raise ValueError(
        f"{_WHERE}: the leaf {name!r} of shape {x.shape} does not hold"
        f" {blocks} heads of equal width on its axes from {layout.head_axis}"
        + (f" after the layer axes {shape[:-1]}" if lead else "")
        + f" (max_logits has shape {shape}, {shape[-1]} heads). Give"
        " layout=oc.QKLayout(head_axis=..., kv_heads=..., fused=...) for"
        " this layout.")
  width = size // blocks
  split = width if layout.nope_dim is None else layout.nope_dim
  if split > width:
    raise ValueError(
        f"{_WHERE}: nope_dim={split} exceeds the {width} entries of each"
        f" head of the leaf {name!r} (shape {x.shape}).")
  entries = jnp.where(jnp.arange(width) < split, first[..., None],
                      rest[..., None])
  return entries.reshape(*shape[:-1], *[1] * (axis - lead),
                         *x.shape[axis:])


def _clipped_update(u: jax.Array, w: jax.Array, f: jax.Array) -> jax.Array:
  """``f * (w + u) - w`` where ``f < 1``, ``u`` (bit for bit) elsewhere."""
  dtype = _tree.acc_dtype(u.dtype)
  f = f.astype(dtype)
  w = jnp.asarray(w).astype(dtype)
  new = f * (w + u.astype(dtype)) - w
  return jnp.where(f < 1, new.astype(u.dtype), u)


def max_logit_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                        bias: jax.Array | None = None,
                        mask: jax.Array | None = None, *,
                        module: Any = None, is_causal: bool = False,
                        **kwargs: Any) -> jax.Array:
  """``nnx.dot_product_attention`` that also records each head's max logit.

  Pass it as ``nnx.MultiHeadAttention(..., attention_fn=oc.max_logit_attention)``
  and call the attention with ``sow_weights=True`` (Flax hands the module
  to ``attention_fn`` only then; without it nothing is recorded, and the
  attention weights themselves are never sown); an attention module of
  one's own calls it with ``module=self``. Each call sows, as
  ``nnx.Intermediate`` named ``"max_logits"`` on that module, the largest
  logit ``q . k / sqrt(head_dim)`` of each query head over the batch,
  query and key positions, masked positions (``mask``, ``is_causal``) left
  out, float32, without gradient; repeated calls keep the elementwise
  maximum. The additive ``bias`` is not part of it (QK-Clip cannot shrink
  it). Collect the values with :func:`gather_max_logits`. Computing the
  logits once more costs one extra query-key product per call; the output
  is ``nnx.dot_product_attention``'s.

  Grouped-query attention: ``key`` and ``value`` may have fewer heads,
  ``kv_heads``, each shared by ``heads // kv_heads`` consecutive query
  heads (query head ``h`` reads key head ``h // (heads // kv_heads)``);
  the logits are recorded per query head, and the key and value heads are
  repeated for the attention itself. Multi-head latent attention: pass the
  heads as they enter the product, ``query = [q^C, q^R]`` and ``key =
  [k^C, k^R]`` with the shared ``k^R`` broadcast to every head.

  Args:
    query: ``[batch..., q_length, heads, head_dim]``.
    key: ``[batch..., kv_length, kv_heads, head_dim]``, ``kv_heads``
      dividing ``heads``.
    value: ``[batch..., kv_length, kv_heads, v_dim]``.
    bias: additive attention bias, as ``nnx.dot_product_attention``.
    mask: boolean mask broadcastable to ``[batch..., heads, q, kv]``.
    module: the module to sow into (Flax passes it with
      ``sow_weights=True``); ``None`` records nothing.
    is_causal: apply a causal mask.
    **kwargs: passed on to ``nnx.dot_product_attention`` (dropout, dtype,
      precision, ...).

  Returns:
    The attention output, ``[batch..., q_length, heads, v_dim]``.

  Raises:
    ValueError: ``key``'s heads do not divide ``query``'s, or ``value``
      has another number of heads than ``key``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> query = jnp.ones((1, 3, 4, 8))      # 4 query heads ...
    >>> key = value = jnp.ones((1, 3, 2, 8))  # ... sharing 2 key heads.
    >>> oc.max_logit_attention(query, key, value).shape
    (1, 3, 4, 8)
  """
  from flax import nnx  # Flax is needed for this helper only.

  heads, kv = query.shape[-2], key.shape[-2]
  if heads % kv or value.shape[-2] != kv:
    raise ValueError(
        f"max_logit_attention: query has {heads} heads, key {kv} and value"
        f" {value.shape[-2]}; the key and value heads must be as many, each"
        " shared by the same number of consecutive query heads.")
  if module is not None:  # Called with sow_weights=True: record.
    module.sow(nnx.Intermediate, _SOWN,
               _head_max(query, key, mask, is_causal),
               init_fn=lambda: jnp.full((), -jnp.inf, jnp.float32),
               reduce_fn=jnp.maximum)
  if kv != heads:  # Every Flax version attends with one key per query head.
    key = jnp.repeat(key, heads // kv, axis=-2)
    value = jnp.repeat(value, heads // kv, axis=-2)
  return nnx.dot_product_attention(query, key, value, bias, mask,
                                   module=None, is_causal=is_causal, **kwargs)


def _head_max(query: jax.Array, key: jax.Array, mask: jax.Array | None,
              is_causal: bool) -> jax.Array:
  """Each head's largest logit ``q . k / sqrt(d)``, masked entries left out."""
  q = jax.lax.stop_gradient(query).astype(jnp.float32)
  k = jax.lax.stop_gradient(key).astype(jnp.float32)
  kv = k.shape[-2]  # Query heads kv * g, grouped: head h reads key h // g.
  q = q.reshape(*q.shape[:-2], kv, q.shape[-2] // kv, q.shape[-1])
  logits = jnp.einsum("...qhgd,...khd->...hgqk", q / math.sqrt(q.shape[-1]),
                      k)
  logits = logits.reshape(*logits.shape[:-4], -1, *logits.shape[-2:])
  keep = jnp.ones(logits.shape, bool)
  if mask is not None:
    keep = keep & jnp.broadcast_to(mask.astype(bool), logits.shape)
  if is_causal:
    keep = keep & jnp.tril(jnp.ones(logits.shape[-2:], bool))
  per_row = jnp.max(jnp.where(keep, logits, -jnp.inf), axis=(-2, -1))
  return jnp.max(per_row.reshape(-1, per_row.shape[-1]), axis=0)


def gather_max_logits(intermediates: Any) -> dict[str, jax.Array]:
  """The max logits :func:`max_logit_attention` sowed, keyed by module path.

  Args:
    intermediates: the ``nnx.Intermediate`` state of ``nnx.capture(model,
      nnx.Intermediate)``, or a model whose attention sowed outside
      ``nnx.capture`` (its ``nnx.state(model, nnx.Intermediate)`` is read;
      the way on Flax versions without ``nnx.capture``, such as 0.12.2).

  Returns:
    A dict from each attention module's ``/``-separated path (``"blocks/0/
    attn"``; ``"layers/attn"`` for layers stacked by ``nnx.vmap`` and run by
    ``nnx.scan``, whose value then has shape ``(layers, heads)``) to its
    per-head max logits: the ``max_logits`` of :func:`qk_clip`.

  Raises:
    ValueError: nothing was recorded.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import optaxclip as oc
    >>> attn = nnx.MultiHeadAttention(
    ...     num_heads=2, in_features=4, decode=False,
    ...     attention_fn=oc.max_logit_attention, rngs=nnx.Rngs(0))
    >>> forward = nnx.capture(lambda m, x: m(x, sow_weights=True),
    ...                       nnx.Intermediate)
    >>> _, intermediates = forward(attn, jnp.ones((3, 5, 4)))
    >>> {k: v.shape for k, v in oc.gather_max_logits(intermediates).items()}
    {'': (2,)}
  """
  from flax import nnx  # Flax is needed for this helper only.

  if isinstance(intermediates, nnx.Module):
    intermediates = nnx.state(intermediates, nnx.Intermediate)
  tree = _pure(intermediates, nnx)
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if path and getattr(path[-1], "key", None) == _SOWN:
      out[_path(path[:-1])] = value
  if not out:
    raise ValueError("gather_max_logits: no max logits were recorded." + _HOW)
  return out


def _pure(tree: Any, nnx: Any) -> Any:
  """The arrays of a state of variables (``nnx.as_pure`` where Flax has it;
  before, each variable's ``value``)."""
  as_pure = getattr(nnx, "as_pure", None)
  if as_pure is not None:
    return as_pure(tree)
  kinds = tuple(k for k in (getattr(nnx, "Variable", None),
                            getattr(nnx, "VariableState", None)) if k)
  return jax.tree_util.tree_map(
      lambda v: v.value if isinstance(v, kinds) else v, tree,
      is_leaf=lambda v: isinstance(v, kinds))

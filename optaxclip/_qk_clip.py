"""QK-Clip (Kimi K2): rescale query and key weights whose attention logits grow.

:func:`qk_clip` is the last link of an optimizer chain; it reads each
attention head's largest pre-softmax logit of the step (an extra argument of
``update``) and shrinks that head's query and key projections so that its
logits shrink by ``max_logit / S_max``. :func:`max_logit_attention` records
those logits in a Flax NNX ``nnx.MultiHeadAttention``;
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

  Attributes:
    query_path: the path of the query projection inside the attention module,
      ``/``-separated (``"query"`` for ``nnx.MultiHeadAttention`` and linen's
      ``MultiHeadDotProductAttention``). Every leaf below it (kernel, bias)
      is scaled.
    key_path: the same for the key projection.
    head_axis: the axis of those leaves that indexes the heads: ``-2`` for
      ``LinearGeneral`` kernels ``(in_features, heads, head_dim)`` and their
      biases ``(heads, head_dim)``, with or without leading layer axes.
  """

  query_path: str = "query"
  key_path: str = "key"
  head_axis: int = -2


_MHA = QKLayout()  # nnx.MultiHeadAttention's layout.


@_stats.named("qk_clip")
class QKClipState(NamedTuple):
  """State of :func:`qk_clip`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`, in float32: ``threshold`` is
      ``max_logit`` in force at the last update (``inf`` when a run-time
      value was not positive: nothing was clipped); ``scale`` the smallest
      factor ``gamma = min(1, max_logit / S_max)`` over the heads of the
      last step (1 when none was clipped); ``clipped`` whether any head
      was clipped; ``frac_clipped`` the fraction of heads clipped.
      ``norm`` is ``None``: the rule reads logits, not the update.
    largest_logit: the largest per-head max logit ``S_max`` of the last
      step, over every head (NaN heads left out; ``-inf`` when all were
      NaN).
    num_heads_clipped: how many heads were clipped at the last update (int32).
    num_nonfinite: how many heads had a NaN or ``+inf`` max logit at the last
      update; they were left untouched (int32).
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
  vanish together) and is counted in ``num_nonfinite``; pair with
  :func:`optaxclip.skip_step` to skip such steps. ``max_logit = inf``
  clips nothing; a ``max_logit`` arriving at run time (a schedule) that
  is 0, negative or NaN clips nothing either. Leaves in no attention
  module are untouched. Not covered: MLA's split of the query/key heads
  into a shared rotary part (Kimi K2 clips only the per-head parts
  there), grouped-query attention (fewer key heads than query heads), and
  fused ``qkv`` kernels; such layouts raise an error naming the leaf.

  Args:
    max_logit: Kimi K2's ``tau``, the largest logit allowed, > 0 (``inf``
      disables): a number, JAX scalar or Optax schedule of the step count.
    query_exponent: Kimi K2's ``alpha``, the share of the factor given to
      the query (the key gets ``1 - query_exponent``), in ``[0, 1]``.
    layout: where each attention module keeps its query and key: one
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
    out = _scale_heads(updates, params, heads, gammas, a, layout)
    s = jnp.concatenate([s.reshape(-1) for _, s in heads])
    g = jnp.concatenate([g.reshape(-1) for g in gammas])
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
                 layout: Any) -> Any:
  """``updates`` with the query and key leaves of each module rescaled."""
  leaves, rebuild = _tree.live_leaves(updates, _WHERE)
  weights = _param_leaves(updates, params)
  names = [_path(path) for path, _ in leaves]
  factors: dict[int, tuple[str, jax.Array]] = {}
  for (module, s), gamma in zip(heads, gammas):
    one = layout.get(module, _MHA) if isinstance(layout, Mapping) \
        else layout
    for part, power in ((one.query_path, query_exponent),
                        (one.key_path, 1 - query_exponent)):
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
      for i in found:
        if i in factors:
          raise ValueError(
              f"{_WHERE}: the leaf {names[i]!r} is the query or key of two"
              f" attention modules ({factors[i][0]!r} and {module!r}).")
        factors[i] = (module, _broadcast(names[i], leaves[i][1], s.shape,
                                         gamma ** power, one.head_axis))
  out = [g for _, g in leaves]
  for i, (_, f) in factors.items():
    out[i] = _clipped_update(out[i], weights[i], f)
  return rebuild(out)


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
               factor: jax.Array, head_axis: int) -> jax.Array:
  """``factor`` (of ``shape``: layers..., heads) shaped to multiply ``x``."""
  lead, h = len(shape) - 1, shape[-1]
  axis = head_axis % x.ndim if -x.ndim <= head_axis < x.ndim else None
  if axis is None or axis < lead or x.shape[:lead] != shape[:-1] or (
      x.shape[axis] != h):
    raise ValueError(
        f"{_WHERE}: the leaf {name!r} of shape {x.shape} does not hold"
        f" {h} heads on axis {head_axis}"
        + (f" after the layer axes {shape[:-1]}" if lead else "")
        + f" (max_logits has shape {shape}). Give layout=oc.QKLayout("
        "head_axis=...) for this layout; grouped-query attention and fused"
        " qkv kernels are not supported.")
  full = [1] * x.ndim
  full[:lead] = shape[:-1]
  full[axis] = h
  return factor.reshape(full)


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
  attention weights themselves are never sown). Each call sows, as ``nnx.Intermediate`` named ``"max_logits"``
  on that module, the largest logit ``q . k / sqrt(head_dim)`` of each head
  over the batch, query and key positions, masked positions (``mask``,
  ``is_causal``) left out, float32, without gradient; repeated calls keep
  the elementwise maximum. The additive ``bias`` is not part of it (QK-Clip
  cannot shrink it). Collect the values with :func:`gather_max_logits`.
  Computing the logits once more costs one extra query-key product per
  call; the output is ``nnx.dot_product_attention``'s.

  Args:
    query: ``[batch..., q_length, heads, head_dim]``.
    key: ``[batch..., kv_length, heads, head_dim]`` (as many heads as
      ``query``).
    value: ``[batch..., kv_length, heads, v_dim]``.
    bias: additive attention bias, as ``nnx.dot_product_attention``.
    mask: boolean mask broadcastable to ``[batch..., heads, q, kv]``.
    module: the module to sow into (Flax passes it with
      ``sow_weights=True``).
    is_causal: apply a causal mask.
    **kwargs: passed on to ``nnx.dot_product_attention`` (dropout, dtype,
      precision, ...).

  Returns:
    The attention output, ``[batch..., q_length, heads, v_dim]``.

  Raises:
    ValueError: ``key`` has another number of heads than ``query``.
  """
  from flax import nnx  # Flax is needed for this helper only.

  if module is None:  # Called without sow_weights=True: nothing to record.
    return nnx.dot_product_attention(query, key, value, bias, mask,
                                     is_causal=is_causal, **kwargs)
  if key.shape[-2] != query.shape[-2]:
    raise ValueError(
        f"max_logit_attention: key has {key.shape[-2]} heads and query"
        f" {query.shape[-2]}; QK-Clip needs one key head per query head.")
  module.sow(nnx.Intermediate, _SOWN, _head_max(query, key, mask, is_causal),
             init_fn=lambda: jnp.full((), -jnp.inf, jnp.float32),
             reduce_fn=jnp.maximum)
  return nnx.dot_product_attention(query, key, value, bias, mask,
                                   module=None, is_causal=is_causal, **kwargs)


def _head_max(query: jax.Array, key: jax.Array, mask: jax.Array | None,
              is_causal: bool) -> jax.Array:
  """Each head's largest logit ``q . k / sqrt(d)``, masked entries left out."""
  q = jax.lax.stop_gradient(query).astype(jnp.float32)
  k = jax.lax.stop_gradient(key).astype(jnp.float32)
  logits = jnp.einsum("...qhd,...khd->...hqk", q / math.sqrt(q.shape[-1]), k)
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

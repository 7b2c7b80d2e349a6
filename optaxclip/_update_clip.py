"""Update clipping: StableAdamW's per-tensor rule, and the update's global norm
against its own recent history."""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _apply, _norms, _stats, _thresholds, _transform, _tree, _validate
from optaxclip._norms import AxisName
from optaxclip._stats import ClipStats
from optaxclip._thresholds import Threshold


@_stats.named("clip_update_rms")
class ClipUpdateRMSState(NamedTuple):
  """State of :func:`clip_update_rms`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`: ``scale`` is the smallest
      per-tensor factor ``1 / max(1, u)`` of the last step; ``clipped``
      whether any tensor's update was scaled down; ``frac_clipped`` the
      fraction of tensors scaled down; ``leaf_norms`` (``leaf_norms=True``)
      each tensor's RMS ``u`` of the last step, a tree like the updates.
      ``norm`` and ``threshold`` are ``None``: the rule compares no norm of
      the update (``u`` is the RMS of the gradient over the root of its
      second moment, held to the constant 1).
    largest_rms: the largest per-tensor RMS ``u`` of the last step.
    num_leaves_clipped: how many tensors were scaled down at the last step
      (int32).
    inner_state: the state of the wrapped optimizer.
  """

  stats: ClipStats
  largest_rms: jax.Array
  num_leaves_clipped: jax.Array
  inner_state: Any


@_stats.named("clip_update_by_history")
class ClipUpdateByHistoryState(NamedTuple):
  """State of :func:`clip_update_by_history`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`: ``norm`` is the global 2-norm
      of the last incoming update (the optimizer's output), before
      clipping; ``threshold`` the threshold in force at the last step,
      ``mean + num_std * max(std, std_floor * mean)`` of the recorded
      norms, or ``inf`` while fewer than ``min_history`` norms are
      recorded; ``scale`` the factor the last update was multiplied by,
      ``min(1, threshold / norm)``; ``leaf_norms`` (``leaf_norms=True``)
      each leaf's norm of the last incoming update.
    norm_history: the ring buffer of recorded (unclipped, finite) norms,
      shape ``(window,)``; only the first ``fill`` slots hold norms.
    fill: how many slots of ``norm_history`` hold norms (int32, at most
      ``window``).
    index: the slot the next norm is written to (int32).
  """

  stats: ClipStats
  norm_history: jax.Array
  fill: jax.Array
  index: jax.Array


@_validate.renamed(b2="decay")
def clip_update_rms(
    inner: optax.GradientTransformation,
    *,
    decay: float | jax.Array | None = None,
    eps: float | jax.Array | None = None,
    axis_name: AxisName = None,
    leaf_norms: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""StableAdamW's update clipping: each tensor's step shrunk by its RMS.

  Wraps an Adam-family optimizer. For each tensor (leaf) with gradient ``g``
  and the optimizer's second moment ``v`` (its ``nu``, read from its state:
  no buffer of its own),

  .. math::

     u = \sqrt{\operatorname{mean}\left(g^2 / \max(\hat v, \epsilon^2)
     \right)}, \qquad \text{update} \leftarrow \text{update} / \max(1, u),

  where ``v̂ = nu / (1 - decay ** t)`` is ``nu`` *after* this step's update
  (it includes ``g``), bias-corrected with the optimizer's step count ``t``.
  This is the rule of StableAdamW (Wortsman et al. 2023, Algorithm 2) as
  the ``torch-optimi`` package implements it: its second moment is updated
  with a debiased ``beta2`` and so equals the bias-corrected ``v̂`` above,
  the RMS is taken after that update, and ``eps`` enters squared. The
  whole update of the tensor is divided, so with
  ``inner=optax.adamw(...)`` the decoupled weight decay is scaled too, as
  StableAdamW scales it (it multiplies the learning rate that both use).
  ``optax.adamw(lr, b1, b2, eps=1e-6, weight_decay=wd)`` wrapped is
  StableAdamW.

  ``decay`` and ``eps`` are the wrapped optimizer's ``b2`` and ``eps``
  (the state keeps only the step count, not them), and by default they
  are read off the optimizer: from its ``optax.inject_hyperparams`` state
  where it has them as hyperparameters (values set in the state are
  followed), else from the optimizer itself (the ``b2`` and ``eps`` of
  the optax Adam-family transformation inside it, e.g.
  ``scale_by_adam``'s, through ``chain`` and optax's other wrappers).
  Where none is found, or several different ones, a ValueError asks for
  ``decay=`` or ``eps=``. An optimizer whose second moment keeps no step
  count (``optax.rmsprop``) is not bias-corrected: ``nu`` is read as it
  is and ``decay`` is not needed.

  Edge cases: a zero gradient gives ``u = 0`` and passes unchanged; an
  element with ``g = 0`` counts 0 whatever ``v`` (so ``eps = 0`` with an
  all-zero tensor is defined); ``u <= 1`` leaves the tensor's update bit for
  bit. At the first step ``v̂ = g ** 2``, so ``u = 1`` up to rounding: the
  tensor is then divided by a factor within an ulp of 1, and the counters
  count a tensor as clipped only where ``u`` exceeds 1 by more than 16 ulps
  of the accumulation dtype.
  A NaN gradient gives NaN ``u`` and a NaN update; an infinite one
  makes ``nu`` infinite and ``u`` NaN. A tensor whose ``u`` overflows float32
  (``g`` huge against ``eps``) is scaled exactly by the overflow-safe kernel.

  The RMS is computed in float32 (float64 for float64 parameters), one read
  of ``g`` and ``nu`` per step, fused by XLA with the rest of the step.
  Inside ``shard_map`` or ``pmap`` with sharded tensors, give ``axis_name``
  so that ``u`` is that of the whole tensor on every device.

  Args:
    inner: the optimizer to wrap, keeping a second moment ``nu`` shaped
      like the gradients (``optax.adamw``, ``adam``, ``nadam``, ``lamb``,
      alone or inside ``inject_hyperparams``, or first in a ``chain``);
      the first such ``nu`` in its state is read. A transformation before
      it (``chain(clip, adamw)``) is refused at ``init``: ``u`` needs the
      gradient the second moment saw; chain it before the wrapper,
      ``chain(clip, clip_update_rms(adamw))``.
    decay: the decay of ``nu``, StableAdamW's ``beta2`` (the optimizer's
      ``b2``, in ``[0, 1)``), for the bias correction of ``nu``; ``None``
      reads it off ``inner``.
    eps: StableAdamW's ``epsilon``, the floor of the second moment,
      applied as ``max(v̂, eps ** 2)`` (>= 0); ``None`` reads the
      optimizer's ``eps`` off ``inner`` (StableAdamW uses one ``eps`` for
      both; its default is 1e-6).
    axis_name: inside ``shard_map``/``pmap``, the axis name (or names) to
      reduce each tensor's mean over.
    leaf_norms: also keep each tensor's ``u`` in the state (a tree, the
      record's ``leaf_norms``); :func:`optaxclip.clip_stats` with
      ``scalars=True`` lists them by path.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipUpdateRMSState`.

  Raises:
    ValueError: at ``init``, when ``inner`` keeps no second moment, or its
      ``b2`` or ``eps`` is needed and cannot be read off it, or a
      transformation comes before its second moment in a ``chain``.

  References:
    Wortsman et al., `Stable and low-precision training for large-scale
    vision-language models <https://arxiv.org/abs/2304.13013>`_, NeurIPS
    2023. ``torch-optimi``'s ``StableAdamW``:
    https://pypi.org/project/torch-optimi/.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = oc.clip_update_rms(optax.adamw(0.1, b2=0.99, eps=1e-6),
    ...                          leaf_norms=True)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    >>> state = opt.init(params)
    >>> for g in [1.0, 1.0, 50.0]:
    ...   grads = {"a": jnp.full(2, g), "b": jnp.ones(2)}
    ...   updates, state = opt.update(grads, state, params)
    >>> u = state.stats.leaf_norms  # Each tensor's RMS.
    >>> print(f"{u['a']:.4f} {u['b']:.4f}", state.num_leaves_clipped)
    1.7227 1.0000 1
    >>> print(jnp.round(updates["a"], 4))  # adamw's step (0.0658) / 1.7227
    [-0.0382 -0.0382]
  """
  caller = "clip_update_rms"
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        f"{caller}: inner must be an optax.GradientTransformation keeping a"
        " second moment (e.g. optax.adamw(...)), got"
        f" {type(inner).__name__}.")
  if decay is not None:
    _validate.check_range(decay, "decay", caller, lo=0.0, hi=1.0,
                          open_hi=True, schedule=False)
  if eps is not None:
    _validate.check_range(eps, "eps", caller, lo=0.0, hi=np.inf,
                          schedule=False)
  _validate.check_bool(leaf_norms, "leaf_norms", caller)
  wrapped = optax.with_extra_args_support(inner)
  settings = functools.partial(_moment_settings, decay=decay, eps=eps,
                               found=_adam_hyperparams(inner), caller=caller)

  def init_fn(params):
    _tree.check_real(params, caller)
    inner_state = wrapped.init(params)
    settings(inner_state, params)  # A clear error now.
    _check_nothing_before(inner_state, params, caller)
    dtype = _tree.tree_acc_dtype(params)
    return ClipUpdateRMSState(
        stats=_stats.fresh(
            dtype, norm=False, frac=True,
            leaf_norms=_tree.zero_leaf_norms(params) if leaf_norms else None),
        largest_rms=jnp.zeros((), dtype),
        num_leaves_clipped=jnp.zeros((), jnp.int32), inner_state=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    out, inner_state = wrapped.update(updates, state.inner_state, params,
                                      **extra_args)
    nu, count, b2, e = settings(inner_state, updates)
    dtype = state.largest_rms.dtype
    out, rms, scales, each, rebuild = _divide_by_rms(
        updates, out, nu, b2, count, e, axis_name, caller)
    # Counted where u exceeds 1 by more than rounding: at the first step
    # u = 1 up to an ulp, which jit and eager round differently.
    num = sum((jnp.sum(u > 1 + 16 * jnp.finfo(u.dtype).eps, dtype=jnp.int32)
               for u in rms), jnp.zeros((), jnp.int32))
    return out, ClipUpdateRMSState(
        stats=_stats.advance(
            state.stats, clipped=num > 0, num=num, of=len(each),
            scale=_apply.smallest(scales, dtype),
            leaf_norms=rebuild([u.astype(dtype) for u in each])
            if leaf_norms else None),
        largest_rms=_apply.largest(rms, dtype), num_leaves_clipped=num,
        inner_state=inner_state)

  return _transform.transformation(init_fn, update_fn, extra_args=True)


def _check_nothing_before(inner_state: Any, like: Any, caller: str) -> None:
  """Raises where ``inner`` transforms the gradient before its second
  moment sees it (``nu`` after the first element of an ``optax.chain``):
  ``u`` would divide the gradient entering the wrapper by the second moment
  of another gradient."""
  want = str(jax.tree_util.tree_structure(like, is_leaf=_tree.is_masked))
  flat, _ = jax.tree_util.tree_flatten_with_path(
      inner_state,
      is_leaf=lambda x: isinstance(x, tuple) and hasattr(x, "nu"))
  for path, node in flat:
    nu = getattr(node, "nu", None)
    if nu is None or not isinstance(node, tuple) or str(
        jax.tree_util.tree_structure(nu, is_leaf=_tree.is_masked)) != want:
      continue
    later = [k.idx for k in path
             if isinstance(k, jax.tree_util.SequenceKey) and k.idx > 0]
    if later:
      raise ValueError(
          f"{caller}: inner transforms the gradients before its second"
          f" moment (element {later[0]} of an optax.chain holds it), so the"
          " RMS would divide the gradient clip_update_rms receives by the"
          " second moment of the transformed one. Wrap the optimizer alone"
          " and chain the transformation before the wrapper, e.g."
          " optax.chain(clip, oc.clip_update_rms(optax.adamw(...))).")
    return


def _setting(name: str, keyword: str, given: Any, inner_state: Any,
             node: Any, found: dict[str, list[Any]], caller: str) -> Any:
  """The wrapped optimizer's ``name`` (``b2`` or ``eps``): ``given`` where
  given, else the hyperparameter of the ``inject_hyperparams`` state that
  holds ``node`` (the second moment), else the one value found in the
  optimizer's update functions."""
  if given is not None:
    return given
  injected = _injected(inner_state, node, name)
  if injected is not None:
    return injected
  values = found.get(name, [])
  if len(values) == 1:
    return values[0]
  what = ("the decay of its second moment, for the bias correction"
          if name == "b2" else "the floor of its second moment")
  if values:
    raise ValueError(
        f"{caller}: the wrapped optimizer holds several values of {name}"
        f" ({', '.join(f'{float(np.asarray(v)):g}' for v in values)}), so"
        " which one its second moment uses is unclear. Pass"
        f" {keyword}= ({what}: the optimizer's {name}).")
  raise ValueError(
      f"{caller}: cannot read the wrapped optimizer's {name} ({what}): it"
      " is neither a hyperparameter of an optax.inject_hyperparams state"
      " nor a value of an optax Adam-family transformation inside it"
      " (static arguments of inject_hyperparams are not read). Pass"
      f" {keyword}= (the optimizer's {name}).")


def _injected(state: Any, node: Any, name: str) -> Any:
  """``hyperparams[name]`` of the innermost ``optax.inject_hyperparams``
  state in ``state`` whose inner state holds ``node``; ``None`` where
  there is none."""
  def injects(x):
    return isinstance(getattr(x, "hyperparams", None), Mapping) and hasattr(
        x, "inner_state")

  def holds(tree):
    return any(x is node for x in jax.tree_util.tree_leaves(
        tree, is_leaf=lambda x: x is node))

  value = None
  todo = [state]
  while todo:
    for x in jax.tree_util.tree_leaves(todo.pop(), is_leaf=injects):
      if injects(x) and holds(x.inner_state):
        if name in x.hyperparams:
          value = x.hyperparams[name]
        todo.append(x.inner_state)
  return value


def _adam_hyperparams(inner: Any) -> dict[str, list[Any]]:
  """The distinct values of ``b2`` and ``eps`` in the closures of the optax
  update functions inside ``inner`` that take a ``b2`` (``scale_by_adam``
  and its family), found through functions' closures,
  ``functools.partial``, tuples (``GradientTransformation``), lists and
  mappings."""
  found: dict[str, list[Any]] = {"b2": [], "eps": []}
  seen: set[int] = set()
  todo = [inner]
  while todo:
    x = todo.pop()
    if id(x) in seen:
      continue
    seen.add(id(x))
    if isinstance(x, functools.partial):
      todo += [x.func, *x.args, *x.keywords.values()]
    elif isinstance(x, (list, tuple)):
      todo += list(x)
    elif isinstance(x, Mapping):
      todo += list(x.values())
    elif isinstance(x, types.FunctionType):
      cells = dict(zip(x.__code__.co_freevars, x.__closure__ or ()))
      values = {}
      for name, cell in cells.items():
        try:
          values[name] = cell.cell_contents
        except ValueError:  # An empty cell.
          continue
      if "b2" in values and x.__module__.split(".")[0] == "optax":
        for name in ("b2", "eps"):
          if name in values and not any(
              _same(values[name], v) for v in found[name]):
            found[name].append(values[name])
      todo += list(values.values())
  return found


def _same(a: Any, b: Any) -> bool:
  """Whether two hyperparameter values are equal (numbers, or arrays
  known now)."""
  if a is b:
    return True
  try:
    return bool(np.asarray(a) == np.asarray(b))
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return False


def _moment_settings(inner_state: Any, like: Any, decay: Any, eps: Any,
                     found: Any, caller: str) -> tuple[Any, Any, Any, Any]:
  """``nu``, the step count (``None``: no bias correction), the decay and
  eps of the wrapped optimizer's state."""
  node = _tree.find_second_moment(inner_state, like, caller)
  count = None
  if "count" in getattr(node, "_fields", ()):  # tuple.count is a method.
    count = jnp.asarray(node.count)
  elif decay is not None:
    raise ValueError(
        f"{caller}: the state holding the second moment"
        f" ({type(node).__name__}) keeps no step count to bias-correct it"
        " with; leave decay=None for an optimizer without bias"
        " correction.")
  b2 = None if count is None else _setting(
      "b2", "decay", decay, inner_state, node, found, caller)
  e = _setting("eps", "eps", eps, inner_state, node, found, caller)
  return node.nu, count, b2, e


def _divide_by_rms(updates: Any, out: Any, nu: Any, b2: Any,
                   count: jax.Array | None, eps: float, axis_name: AxisName,
                   caller: str) -> tuple[Any, list[jax.Array],
                                        list[jax.Array], list[jax.Array], Any]:
  """Each tensor of ``out`` divided by ``max(1, u)``.

  Returns the clipped ``out``; the ``u`` and the factors stacked per group
  of tensors of one type; the ``u`` per tensor, and the rebuilder of the
  gradients' tree.
  """
  leaves, rebuild = _tree.live_leaves(updates, caller)
  gs = [x for _, x in leaves]
  axes = [tuple(range(g.ndim)) for g in gs]  # Whole tensors.
  groups, norms = _norms.grouped_leaf_norms(
      _normalized(gs, _tree.float_leaves(nu, caller), b2, count, eps),
      "rms", axes, axis_name=axis_name)
  ys, rebuild_out = _tree.live_leaves(out, caller)
  one = jnp.ones((), _tree.common_acc_dtype(gs))
  clipped, values, scales = _apply.apply_grouped(
      [y for _, y in ys], groups, norms, [one] * len(groups))
  each = _apply.ungroup(groups, values, gs, axes)
  return rebuild_out(clipped), values, scales, each, rebuild


def _normalized(gs: list[jax.Array], nus: list[jax.Array],
                b2: Any, count: jax.Array | None, eps: float
                ) -> list[jax.Array]:
  """Each ``g / sqrt(max(v̂, eps**2))`` (0 where ``g`` is 0), in the
  accumulation dtype: its RMS is the tensor's ``u``."""
  out = []
  for g, v in zip(gs, nus):
    dtype = _tree.acc_dtype(g.dtype)
    ga, va = g.astype(dtype), v.astype(dtype)
    if count is not None:
      va = va / (1 - jnp.asarray(b2, dtype) ** count.astype(dtype))
    floor = jnp.asarray(eps, dtype) ** 2
    out.append(jnp.where(ga == 0, jnp.zeros((), dtype),
                         ga / jnp.sqrt(jnp.maximum(va, floor))))
  return out


@_validate.renamed(
    sigma="num_std",
    min_std="was replaced by std_floor=, relative: the deviation used is at"
    " least std_floor * mean")
def clip_update_by_history(
    *,
    window: int = 128,
    num_std: Threshold = 3.0,
    min_history: int | None = None,
    std_floor: float = 1e-6,
    axis_name: AxisName = None,
    leaf_norms: bool = False,
) -> optax.GradientTransformation:
  """Clips the update's global norm to ``mean + num_std * std`` of its history.

  Placed *after* the optimizer (``chain(adamw(...),
  clip_update_by_history())``), it scales the whole update by
  ``min(1, t / n)``, ``n`` the update's global 2-norm and

  ``t = mean + num_std * max(std, std_floor * mean)``

  over the norms of the last ``window`` updates, the current one excluded
  (population standard deviation, ``ddof = 0``). While fewer than
  ``min_history`` norms are recorded (by default ``max(2, window // 2)``:
  64 of 128), ``t = inf`` and nothing is clipped. Each step's *unclipped*
  norm is recorded, so a run of clipped steps raises the threshold instead of
  locking it in place. This is levanter's
  ``clip_update_by_historical_norm`` (its ``rolling_interval_length`` is
  ``window``, its ``sigma_factor`` is ``num_std``).

  Two deviations. A non-finite norm (NaN or inf, or a finite update whose
  norm overflows) is not recorded. Recorded, it would make the mean NaN or
  infinite, and so switch clipping off for the next ``window`` steps. That
  step's update is still scaled by the rule (a NaN norm gives a NaN update,
  an infinite one a zero factor, as :func:`optaxclip.clip_by_global_norm`);
  :func:`optaxclip.skip_step` drops such steps. And the floor on the
  standard deviation is relative, ``std_floor * mean``, where levanter's is
  the absolute 1e-6: the same wherever the history's spread is not tiny,
  and independent of the updates' scale where it is.

  Edge cases: a zero update passes unchanged; a history of equal norms has
  ``std = 0`` and clips above ``mean * (1 + num_std * std_floor)`` (a
  history of zeros: ``t = 0``, so a nonzero update after it is zeroed, and
  recorded); ``num_std = inf`` never clips; a ``num_std`` schedule's
  negative or NaN value acts as 0.

  Args:
    window: how many recent norms to keep (the ring buffer's size), >= 2;
      levanter's ``rolling_interval_length``.
    num_std: how many standard deviations above the mean to allow (>= 0),
      levanter's ``sigma_factor``: a number, JAX scalar or Optax schedule
      of the step count.
    min_history: how many norms must be recorded before anything is
      clipped, in ``[1, window]``; ``None`` means ``max(2, window // 2)``.
    std_floor: the floor on the standard deviation relative to the mean
      (>= 0): the deviation used is ``max(std, std_floor * mean)``.
    axis_name: inside ``shard_map``/``pmap`` with sharded updates, the axis
      name (or names) to reduce the norm over.
    leaf_norms: also keep each leaf's norm in the state (a tree), as
      :func:`optaxclip.clip_by_global_norm` does.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ClipUpdateByHistoryState`.

  References:
    levanter's ``clip_update_by_historical_norm``:
    https://github.com/stanford-crfm/levanter.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> clip = oc.clip_update_by_history(window=4, num_std=1.0)
    >>> state = clip.init(jnp.zeros(1))
    >>> for n in [1.0, 3.0, 10.0, 2.0, 1.0, 30.0]:
    ...   u, state = clip.update(jnp.array([n]), state)
    ...   print(f"{float(u[0]):.4f} {float(state.stats.threshold):.4f}")
    1.0000 inf
    3.0000 inf
    3.0000 3.0000
    2.0000 8.5253
    1.0000 7.5355
    7.5355 7.5355
    >>> print(state.norm_history)  # The last 4 norms, unclipped: a ring.
    [ 1. 30. 10.  2.]
  """
  caller = "clip_update_by_history"
  _validate.check_int(window, "window", caller, lo=2)
  size = _validate.static_size(window, "window", caller)
  least = max(2, size // 2) if min_history is None else min_history
  _validate.check_int(least, "min_history", caller, lo=1)
  if int(least) > size:
    raise ValueError(
        f"{caller}: min_history={int(least)} exceeds window={size}: the"
        " window never holds that many norms, so nothing would be clipped."
        " Give min_history <= window.")
  _validate.check_threshold(num_std, "num_std", caller)
  _validate.check_range(std_floor, "std_floor", caller, lo=0.0, hi=np.inf,
                        schedule=False)
  _validate.check_bool(leaf_norms, "leaf_norms", caller)

  def init_fn(params):
    dtype = _tree.tree_acc_dtype(params)
    return ClipUpdateByHistoryState(
        stats=_stats.fresh(
            dtype, threshold=jnp.full((), jnp.inf, dtype),
            leaf_norms=_tree.zero_leaf_norms(params) if leaf_norms else None),
        norm_history=jnp.zeros((size,), dtype),
        fill=jnp.zeros((), jnp.int32), index=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    dtype = state.norm_history.dtype
    parts, each = _norms.global_and_leaf_norms(
        updates, 2, axis_name=axis_name, leaves=leaf_norms)
    norm = parts.value().astype(dtype)
    k = _thresholds.resolve(num_std, state.stats.count, dtype)
    threshold = _history_threshold(state, k, int(least), std_floor)
    updates, scale = _apply.clip_tree(updates, parts, threshold)
    return updates, ClipUpdateByHistoryState(
        stats=_stats.advance(
            state.stats, clipped=norm > threshold, norm=norm,
            threshold=threshold, scale=scale.value().astype(dtype),
            leaf_norms=each),
        **_record(state, norm))

  return _transform.transformation(init_fn, update_fn)


def _history_threshold(state: ClipUpdateByHistoryState, num_std: jax.Array,
                       least: int, std_floor: float) -> jax.Array:
  """``mean + num_std * max(std, std_floor * mean)`` of the recorded
  norms, or ``inf`` while fewer than ``least`` are recorded."""
  h = state.norm_history
  dtype = h.dtype
  valid = jnp.arange(h.shape[0]) < state.fill
  k = jnp.maximum(state.fill, 1).astype(dtype)
  mean = jnp.sum(jnp.where(valid, h, 0), dtype=dtype) / k
  var = jnp.sum(jnp.where(valid, jnp.square(h - mean), 0), dtype=dtype) / k
  std = jnp.maximum(jnp.sqrt(var), jnp.asarray(std_floor, dtype) * mean)
  # num_std = inf with std = 0 would give inf * 0; inf is meant.
  spread = jnp.where(jnp.isinf(num_std), num_std, num_std * std)
  return jnp.where(state.fill >= least, mean + spread,
                   jnp.asarray(jnp.inf, dtype))


def _record(state: ClipUpdateByHistoryState, norm: jax.Array
            ) -> dict[str, jax.Array]:
  """The ring buffer with ``norm`` written, when it is finite."""
  ok = jnp.isfinite(norm)
  size = state.norm_history.shape[0]
  history = jnp.where(ok, state.norm_history.at[state.index].set(norm),
                      state.norm_history)
  return dict(norm_history=history,
              fill=jnp.where(ok, jnp.minimum(state.fill + 1, size), state.fill),
              index=jnp.where(ok, (state.index + 1) % size, state.index))


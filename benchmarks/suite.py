"""What is measured: transforms, their baselines, and the bytes each must move.

Each measurement group runs its cases interleaved (``timing.interleave``) and
always includes its own memory-bound case: a donated in-place scale of one
flat buffer as large as the gradient tree, whose read + write bandwidth is the
bound every row of the group is compared with.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc
from benchmarks import timing, trees

Factory = Callable[["Context"], optax.GradientTransformation]

ADAMW_PASSES = 7  # Read grads, params, mu, nu; write params, mu, nu.


@dataclasses.dataclass
class Context:
  """The gradient tree of one (tree, dtype) pair and thresholds that clip it."""

  tree: str
  dtype: str
  grads: Any
  params: Any
  global_norm: float
  nbytes: int
  size: int

  @property
  def global_threshold(self) -> float:
    return 0.5 * self.global_norm  # Every step clips (inputs are refilled x2).

  leaf_threshold = trees.SIGMA  # Below the norm of every leaf but the tiniest.
  rms_threshold = 0.5 * trees.SIGMA
  value_threshold = trees.SIGMA
  agc_clipping = 0.01  # Grad/param unit-norm ratio is SIGMA / PARAM_SIGMA.


PARAM_SIGMA = 0.02


@dataclasses.dataclass
class Baseline:
  impl: str  # "optax", "optaxclip" or "torch"
  name: str
  make: Callable[[Context], Any]


@dataclasses.dataclass
class Spec:
  """One clipping transform and what a user would pick instead.

  Attributes:
    key: short identifier.
    name: the optaxclip call that is measured.
    passes: the fewest passes over the gradient bytes a standalone update
      needs (a read or a write of every element is one pass).
    chain_extra: the fewest passes it adds to a fused AdamW update.
    make: builds the optaxclip transform.
    baselines: alternatives timed beside it.
    needs_params: whether ``update`` needs ``params``.
    chained: builds the chained optimizer from the AdamW one (default
      ``optax.chain(make(ctx), adamw)``).
  """

  key: str
  name: str
  passes: int
  chain_extra: int
  make: Factory
  baselines: list[Baseline]
  needs_params: bool = False
  chained: Callable[[Context, Any], Any] | None = None


def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


def specs(with_torch: bool) -> list[Spec]:
  """The transforms to measure; adaptive ones when optaxclip exports them."""
  def gn(ctx):
    return oc.clip_by_global_norm(ctx.global_threshold)

  ours_gn = Baseline("optaxclip", "optaxclip.clip_by_global_norm", gn)
  out = [
      Spec("value", "clip_by_value", 2, 0,
           lambda c: oc.clip_by_value(c.value_threshold),
           [Baseline("optax", "optax.clip", lambda c: optax.clip(
               c.value_threshold))]
           + ([Baseline("torch", "torch clip_grad_value_(foreach)",
                        lambda c: ("value", c.value_threshold))]
              if with_torch else [])),
      Spec("value_stats", "clip_by_value(full_stats=True)", 2, 0,
           lambda c: oc.clip_by_value(c.value_threshold, full_stats=True),
           [Baseline("optax", "optax.clip", lambda c: optax.clip(
               c.value_threshold))]),
      Spec("norm", "clip_by_norm", 3, 1,
           lambda c: oc.clip_by_norm(c.leaf_threshold), []),
      Spec("block_rms", 'clip_by_norm(ord="rms")', 3, 1,
           lambda c: oc.clip_by_norm(c.rms_threshold, ord="rms"),
           [Baseline("optax", "optax.clip_by_block_rms",
                     lambda c: optax.clip_by_block_rms(c.rms_threshold))]),
      Spec("global_norm", "clip_by_global_norm", 3, 1, gn,
           [Baseline("optax", "optax.clip_by_global_norm",
                     lambda c: optax.clip_by_global_norm(c.global_threshold))]
           + ([Baseline("torch", "torch clip_grad_norm_(foreach)",
                        lambda c: ("norm", c.global_threshold))]
              if with_torch else [])),
  ]
  if hasattr(oc, "adaptive_grad_clip"):
    out.append(Spec(
        "agc", "adaptive_grad_clip", 4, 2,
        lambda c: oc.adaptive_grad_clip(c.agc_clipping),
        [Baseline("optax", "optax.adaptive_grad_clip",
                  lambda c: optax.adaptive_grad_clip(c.agc_clipping))],
        needs_params=True))
  if hasattr(oc, "clip_by_quantile"):
    out.append(Spec("quantile", "clip_by_quantile(window=1000)", 3, 1,
                    lambda c: oc.clip_by_quantile(0.9, window=1000),
                    [ours_gn]))
  if hasattr(oc, "zclip"):
    out.append(Spec("zclip", "zclip", 3, 1, lambda c: oc.zclip(), [ours_gn]))
  if hasattr(oc, "skip_step"):
    out.append(Spec("skip_step", "skip_step(clip_by_global_norm)", 3, 1,
                    lambda c: oc.skip_step(gn(c)), [ours_gn],
                    chained=lambda c, opt: oc.skip_step(opt)))
  return out


def make_context(tree: str, dtype: str) -> Context:
  shapes = trees.TREES[tree]()
  grads = trees.make_tree(shapes, trees.DTYPES[dtype], seed=0)
  params = trees.make_tree(shapes, trees.DTYPES[dtype], seed=1,
                           sigma=PARAM_SIGMA)
  return Context(tree=tree, dtype=dtype, grads=grads, params=params,
                 global_norm=trees.tree_norm64(grads),
                 nbytes=trees.tree_nbytes(grads),
                 size=trees.num_params(shapes))


# ----------------------------------------------------------------------------
# Cases.


def _double(tree):
  return jax.tree_util.tree_map(lambda x: x * 2, tree)


_double_jit = jax.jit(_double, donate_argnums=0)


def _refill(carry):
  """Doubles the gradients in place so that the next step clips again."""
  g = _double_jit(carry[0])
  jax.block_until_ready(g)
  return (g,) + tuple(carry[1:])


def bound_case(ctx: Context) -> timing.Case:
  """The memory bound: a donated in-place scale of one flat buffer."""
  dtype = trees.DTYPES[ctx.dtype]

  def setup():
    return jnp.zeros((ctx.size,), dtype), jnp.ones((), dtype)

  return timing.jax_case("in-place scale (bound)", "bound",
                         lambda x, s: (x * s,), setup, donate=(0,))


def transform_case(name: str, impl: str, tx, ctx: Context,
                   needs_params: bool) -> timing.Case:
  """A standalone update: donated grads and state, params read only."""
  if needs_params:
    def fn(g, st, p):
      return tx.update(g, st, p)

    def setup():
      return (trees.copy_tree(ctx.grads),
              trees.copy_tree(tx.init(ctx.params)), ctx.params)
  else:
    def fn(g, st):
      return tx.update(g, st)

    def setup():
      return trees.copy_tree(ctx.grads), trees.copy_tree(tx.init(ctx.grads))
  return timing.jax_case(name, impl, fn, setup, donate=(0, 1), refill=_refill)


def torch_case(name: str, what: tuple[str, float], ctx: Context) -> timing.Case:
  """``torch.nn.utils.clip_grad_*_`` with ``foreach=True``, in place."""
  import torch

  kind, threshold = what
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[ctx.dtype]
  on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  device = "cuda" if on_gpu else "cpu"

  def sync():
    if on_gpu:
      torch.cuda.synchronize()

  def setup():
    params = []
    for g in jax.tree_util.tree_leaves(ctx.grads):
      p = torch.nn.Parameter(torch.empty(g.shape, dtype=tdtype, device=device))
      p.grad = torch.from_numpy(np.array(g.astype(jnp.float32))).to(
          device=device, dtype=tdtype)
      params.append(p)
    sync()
    return params

  def step(params):
    if kind == "norm":
      torch.nn.utils.clip_grad_norm_(params, threshold, foreach=True)
    else:
      torch.nn.utils.clip_grad_value_(params, threshold, foreach=True)
    sync()
    return params

  def refill(params):
    torch._foreach_mul_([p.grad for p in params], 2.0)
    sync()
    return params

  return timing.Case(name, "torch", setup, step, refill)


def adamw() -> optax.GradientTransformation:
  return optax.adamw(1e-3, weight_decay=1e-4)


def chained_fn(opt) -> Callable:
  def fn(p, st, g):
    u, st = opt.update(g, st, p)
    return optax.apply_updates(p, u), st
  return fn


def chained_case(name: str, impl: str, opt, ctx: Context) -> timing.Case:
  """``opt.update`` + ``apply_updates``; params and state donated."""
  def setup():
    return (trees.copy_tree(ctx.params), trees.copy_tree(opt.init(ctx.params)),
            ctx.grads)
  return timing.jax_case(name, impl, chained_fn(opt), setup, donate=(0, 1))


def chain_with(spec: Spec, make: Callable, ctx: Context):
  if spec.chained is not None and make is spec.make:
    return spec.chained(ctx, adamw())
  return optax.chain(make(ctx), adamw())


def chained_name(spec: Spec, make: Callable, name: str) -> str:
  if spec.chained is not None and make is spec.make:
    return f"optaxclip.{spec.key}(adamw)"
  return f"chain({name}, adamw)"


def compile_pair(spec: Spec, ctx: Context, reps: int) -> dict[str, Any] | None:
  """Compile time of the chained update: optaxclip's vs optax's transform."""
  optax_baselines = [b for b in spec.baselines if b.impl == "optax"]
  if not optax_baselines:
    return None
  b = optax_baselines[0]
  args = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ctx.params)

  def abstract(opt):
    return args, jax.eval_shape(opt.init, ctx.params), args

  out = {}
  for impl, make in (("optaxclip", spec.make), ("optax", b.make)):
    opt = optax.chain(make(ctx), adamw())
    out[impl], _ = timing.compile_seconds(
        lambda make=make: chained_fn(optax.chain(make(ctx), adamw())),
        abstract(opt), donate=(0, 1), reps=reps)
  return out


def bytes_bound_ratio(spec: Spec) -> float:
  return (ADAMW_PASSES + spec.chain_extra) / ADAMW_PASSES


def gbps(nbytes: float, seconds: float) -> float:
  return nbytes / seconds / 1e9 if seconds > 0 else math.nan

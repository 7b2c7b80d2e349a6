"""A user's training code, written against optaxclip's public annotations.

``mypy`` checks this file together with the package (``.ci/run``), so a
signature that stops accepting what users pass, or an alias that is no longer
exported, fails CI. The lines marked ``# type: ignore[...]`` must stay errors:
with ``warn_unused_ignores`` an ignore that silences nothing is itself an error.
``tests/test_typing.py`` also runs it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaxclip as oc

Params = dict[str, jax.Array]
Batch = tuple[jax.Array, jax.Array]


def make_optimizer(max_norm: oc.Threshold = 1.0,
                   ord: oc.Ord = 2) -> optax.GradientTransformation:
  """A clipper in front of AdamW, the threshold a number or a schedule."""
  return optax.chain(oc.clip_by_global_norm(max_norm, ord=ord),
                     optax.adamw(1e-3))


def per_unit(axis: oc.Axis = 0) -> optax.GradientTransformation:
  return optax.chain(oc.clip_by_norm(0.5, axis=axis),
                     oc.adaptive_grad_clip(0.01, axis=axis))


def data_parallel(axis_name: oc.AxisName = "data") -> optax.GradientTransformation:
  return oc.clip_by_global_norm(1.0, axis_name=axis_name, mask={"w": True,
                                                                "b": False})


def zscore_rule(num_std: oc.Threshold = 2.5) -> oc.ZScore:
  return oc.ZScore(decay=0.9, num_std=num_std, warmup_steps=2, mode="mean")


def guarded(rule: oc.SpikeEMA | oc.SpikeWindow | None = None
            ) -> optax.GradientTransformation:
  """ZClip and SGD, skipped on a huge or spiking gradient."""
  rule = rule or oc.SpikeEMA(max_ratio=5.0, decay=0.9, warmup_steps=2)
  return oc.skip_step(
      optax.chain(oc.zclip(zscore_rule(), max_norm=10.0), optax.sgd(1e-2)),
      skip_norm=100.0, rule=rule)


def adaptive() -> list[optax.GradientTransformation]:
  return [oc.clip_by_value(0.1), oc.clip_by_value(1.0, min_value=-0.5),
          oc.clip_by_value(0.5, full_stats=True),
          oc.clip_by_quantile(0.9, window=100), oc.check_finite(),
          oc.adagc(1.05, decay=0.98, warmup_steps=2, max_norm=1.0),
          oc.clip_spikes(50.0, decay=0.99),
          oc.spike_clipped(optax.adam(1e-3), max_ratio=50.0),
          oc.clip_update_rms(optax.adamw(1e-3, eps=1e-6)),
          oc.clip_update_by_history(window=8, num_std=3.0),
          guarded(oc.SpikeWindow(window=8, min_history=2, watch="norm"))]


def step(opt: optax.GradientTransformation, params: Params, grads: Params,
         opt_state: optax.OptState) -> tuple[Params, optax.OptState, float]:
  updates, opt_state = jax.jit(opt.update)(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  norm: jax.Array = oc.global_norm(grads)
  stats: dict[str, Any] = oc.clip_stats(opt_state)
  del stats
  return params, opt_state, float(norm)


def read_stats(stats: oc.ClipStats) -> tuple[jax.Array, jax.Array | None,
                                             jax.Array | None]:
  """What every state's record holds: its count, norm and clip count."""
  return stats.count, stats.norm, stats.num_clipped


def loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def private_gradient(params: Params, batch: Batch, clip: oc.ExampleClip
                     ) -> tuple[Params, oc.PerExampleInfo]:
  """The sum of the batch's per-example gradients, each clipped."""
  grad_fn = jax.jit(oc.clipped_grad(loss, clip=clip, batch_argnums=(1, 2)))
  grads, info = grad_fn(params, *batch)
  return grads, info


def per_example(params: Params, batch: Batch
                ) -> tuple[Any, oc.PerExampleInfo]:
  """Per-example gradients clipped layer by layer, then summed."""
  x, y = batch
  grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
  return oc.per_example_clip(grads, oc.ExampleClip(0.5, per_layer=True))


def main() -> None:
  params: Params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  grads: Params = {"w": jnp.full((3, 2), 10.0), "b": jnp.ones(2)}
  schedule = optax.linear_schedule(2.0, 0.5, 100)
  for opt in [make_optimizer(), make_optimizer(schedule, ord="rms"),
              make_optimizer(jnp.asarray(1.0), ord=jnp.inf), per_unit(),
              guarded(), *adaptive()]:
    _, _, norm = step(opt, params, grads, opt.init(params))
    assert norm > 0

  clip = oc.clip_by_global_norm(1.0)
  state = clip.init(params)
  _, state = clip.update(grads, state)
  assert isinstance(state, oc.ClipByGlobalNormState)
  count, seen, num_clipped = read_stats(state.stats)
  assert int(count) == 1 and seen is not None and float(seen) > 1
  assert num_clipped is not None and int(num_clipped) == 1

  opt = guarded()
  opt_state = opt.init(params)
  update = jax.jit(opt.update)
  for scale in [1.0, 1.0, 1.0, 50.0]:
    scaled = {k: scale * g for k, g in grads.items()}
    _, opt_state = update(scaled, opt_state, params)
  assert isinstance(opt_state, oc.SkipStepState)
  assert bool(opt_state.skipped) and int(opt_state.num_skipped) == 1
  zclip_state = opt_state.inner_state[0]
  assert isinstance(zclip_state, oc.ZClipState)
  assert int(read_stats(zclip_state.stats)[0]) == 3  # The steps taken.

  x = jnp.arange(12.0).reshape(4, 3)
  y = jnp.ones((4, 2))
  summed, info = private_gradient(params, (x, y),
                                  oc.ExampleClip(1.0, normalize=True))
  assert int(info.num_examples) == 4 and summed["w"].shape == (3, 2)
  _, info = per_example(params, (x, y))
  assert int(info.num_examples_clipped) > 0


def wrong_uses() -> None:
  """Calls a type checker must reject; never run."""
  oc.clip_by_global_norm("1.0")  # type: ignore[arg-type]
  oc.clip_by_norm(1.0, axis="rows")  # type: ignore[arg-type]
  oc.global_norm({}, axis_name=0)  # type: ignore[arg-type]
  oc.zclip(warmup_steps=3)  # type: ignore[call-arg]
  oc.ZScore(mode="median")  # type: ignore[arg-type]
  oc.SpikeEMA(max_ratio="5")  # type: ignore[arg-type]
  oc.skip_step(optax.sgd(0.1), rule=oc.ZScore())  # type: ignore[arg-type]
  oc.ExampleClip(1.0, automatic="yes")  # type: ignore[arg-type]
  _ = oc.ClipStats(jnp.zeros(())).grad_norm  # type: ignore[attr-defined]


if __name__ == "__main__":
  main()

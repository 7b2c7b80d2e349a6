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


def make_optimizer(max_norm: oc.Threshold = 1.0,
                   ord: oc.Ord = 2) -> optax.GradientTransformation:
  """A clipper in front of AdamW, the threshold a number or a schedule."""
  return optax.chain(oc.clip_by_global_norm(max_norm, ord=ord),
                     optax.adamw(1e-3))


def per_unit(axis: oc.Axis = 0) -> optax.GradientTransformation:
  return optax.chain(oc.clip_by_norm(0.5, axis=axis),
                     oc.adaptive_grad_clip(0.01, axis=axis))


def data_parallel(axis_name: oc.AxisName = "data") -> optax.GradientTransformation:
  return oc.clip_by_global_norm(1.0, axis_name=axis_name)


def guarded() -> optax.GradientTransformation:
  return oc.skip_step(optax.chain(oc.zclip(), optax.sgd(1e-2)), max_norm=100.0)


def adaptive() -> list[optax.GradientTransformation]:
  return [oc.clip_by_value(0.1), oc.clip_by_value(1.0, -0.5),
          oc.clip_by_quantile(0.9, history=100), oc.check_finite()]


def step(opt: optax.GradientTransformation, params: Params, grads: Params,
         opt_state: optax.OptState) -> tuple[Params, optax.OptState, float]:
  updates, opt_state = opt.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  norm: jax.Array = oc.global_norm(grads)
  stats: dict[str, Any] = oc.clip_stats(opt_state)
  del stats
  return params, opt_state, float(norm)


def read_state(state: oc.ClipByGlobalNormState) -> tuple[jax.Array, jax.Array]:
  return state.grad_norm, state.num_clipped


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
  grad_norm, num_clipped = read_state(state)
  assert float(grad_norm) > 1 and int(num_clipped) == 1


def wrong_uses() -> None:
  """Calls a type checker must reject; never run."""
  oc.clip_by_global_norm("1.0")  # type: ignore[arg-type]
  oc.clip_by_norm(1.0, axis="rows")  # type: ignore[arg-type]
  oc.global_norm({}, axis_name=0)  # type: ignore[arg-type]


if __name__ == "__main__":
  main()

"""clip_stats over nested optimizer states, and check_finite."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

PARAMS = {"emb": jnp.ones((4, 3)), "w": jnp.ones((3, 2))}
GRADS = jax.tree.map(lambda p: 2 * p, PARAMS)


def step(opt, steps=1):
  state = opt.init(PARAMS)
  for _ in range(steps):
    _, state = jax.jit(opt.update)(GRADS, state, PARAMS)
  return state


def test_single_clipper_uses_plain_field_names():
  state = step(optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-3)), 3)
  stats = oc.clip_stats(state)
  assert set(stats) == set(oc.ClipByGlobalNormState._fields)
  np.testing.assert_allclose(stats["grad_norm"], 2 * np.sqrt(18), rtol=1e-6)
  assert int(stats["count"]) == 3 and int(stats["num_clipped"]) == 3


def test_several_clippers_are_prefixed_and_numbered():
  opt = optax.chain(oc.clip_by_value(1.5, stats=True), oc.clip_by_global_norm(1.0),
                    oc.clip_by_global_norm(0.5), optax.sgd(0.1))
  stats = oc.clip_stats(step(opt))
  assert "clip_by_value/frac_clipped" in stats
  np.testing.assert_allclose(stats["clip_by_value/grad_norm"], 2 * np.sqrt(18),
                             rtol=1e-6)
  # The first global clip sees the value-clipped update; the second sees
  # the first one's output, of norm 1.
  np.testing.assert_allclose(stats["clip_by_global_norm#0/grad_norm"],
                             1.5 * np.sqrt(18), rtol=1e-6)
  np.testing.assert_allclose(stats["clip_by_global_norm#1/grad_norm"], 1.0,
                             rtol=1e-6)


def test_inject_hyperparams_state():
  opt = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0)
  stats = oc.clip_stats(step(opt))
  np.testing.assert_allclose(stats["scale"], 1 / (2 * np.sqrt(18)), rtol=1e-6)


def test_no_clipper_gives_empty_dict():
  assert oc.clip_stats(step(optax.adam(1e-3))) == {}


def test_flax_nnx_optimizer_state():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, optax.chain(oc.clip_by_global_norm(0.1), optax.adam(1e-3)),
      wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)

  train_step(model, optimizer, jnp.ones((5, 3)))
  stats = oc.clip_stats(optimizer.opt_state)
  assert isinstance(stats["grad_norm"], jax.Array)
  assert float(stats["grad_norm"]) > 0.1
  assert int(stats["num_clipped"]) == 1


def test_check_finite_names_the_leaf():
  opt = optax.chain(oc.check_finite(), oc.clip_by_global_norm(1.0))
  grads = {"a": jnp.ones(2), "b": {"c": jnp.array([1.0, jnp.inf, jnp.nan])}}
  state = opt.init(grads)
  with pytest.raises(Exception, match=r"\['b'\]\['c'\]: 1 NaN and 1 Inf"):
    jax.block_until_ready(jax.jit(opt.update)(grads, state))
  updates, state = jax.jit(opt.update)(GRADS, opt.init(GRADS))
  assert np.isfinite(oc.global_norm(updates))
  assert int(state[0].count) == 1


def test_check_finite_without_jit_raises_python_error():
  tx = oc.check_finite()
  grads = {"w": jnp.array([jnp.nan])}
  with pytest.raises(Exception, match=r"non-finite gradient at \['w'\]"):
    jax.block_until_ready(tx.update(grads, tx.init(grads)))

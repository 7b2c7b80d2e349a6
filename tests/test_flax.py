"""optaxclip inside Flax train steps: NNX Optimizer and linen TrainState."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

nnx = pytest.importorskip("flax.nnx")


def regression_data(n=256, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 8)).astype(np.float32)
  y = (x @ rng.standard_normal((8, 1)) * 30).astype(np.float32)  # Unscaled.
  return jnp.asarray(x), jnp.asarray(y)


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(8, 16, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


@pytest.mark.parametrize("clipper", [
    oc.clip_by_global_norm(1.0), oc.clip_by_norm(1.0),
    oc.clip_by_norm(1.0, axis=0), oc.clip_by_value(0.5, full_stats=True)],
                         ids=["global_norm", "norm", "norm_axis0", "value"])
@pytest.mark.slow
def test_nnx_train_step_loss_decreases(clipper):
  x, y = regression_data()
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(clipper, optax.adam(3e-2)),
                            wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(150)]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.2 * losses[0]
  stats = {k.split("/", 1)[1]: v
           for k, v in oc.clip_stats(optimizer.opt_state).items()}
  assert int(stats["count"]) == 150
  assert int(stats["num_clipped"]) > 0  # Unscaled targets: it did clip.


def test_linen_train_state():
  linen = pytest.importorskip("flax.linen")
  from flax.training import train_state

  x, y = regression_data()
  model = linen.Sequential([linen.Dense(16), linen.relu, linen.Dense(1)])
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.key(0), x),
      tx=optax.chain(oc.clip_by_global_norm(1.0), optax.adam(3e-2)))

  @jax.jit
  def train_step(state):
    def loss_fn(params):
      return jnp.mean((state.apply_fn(params, x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(150):
    state, loss = train_step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.2 * losses[0]
  stats = oc.clip_stats(state.opt_state)
  assert float(stats["clip_by_global_norm/norm"]) > 0 and int(
      stats["clip_by_global_norm/count"]) == 150

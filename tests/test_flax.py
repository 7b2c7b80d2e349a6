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


@pytest.mark.slow
def test_injected_threshold_changes_without_a_new_trace():
  # jax.jit: an array of the state's dtype and shape reuses the trace; a
  # Python number (weakly typed) traces once more. nnx.Optimizer: setting
  # the variable's value reuses it.
  params = {"w": jnp.ones(3)}
  opt = optax.chain(optax.inject_hyperparams(oc.clip_by_global_norm)(
      max_norm=1.0), optax.sgd(0.1))
  traces = []

  @jax.jit
  def step(state):
    traces.append(1)
    return opt.update({"w": jnp.full(3, 4.0)}, state, params)[1]

  state = step(opt.init(params))
  hyperparams = state[0].hyperparams
  hyperparams["max_norm"] = jnp.asarray(2.0, hyperparams["max_norm"].dtype)
  state = step(state)
  assert len(traces) == 1
  assert float(oc.clip_stats(state)["clip_by_global_norm/threshold"]) == 2.0
  state[0].hyperparams["max_norm"] = 3.0
  step(state)
  assert len(traces) == 2

  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)
  x = jnp.ones((2, 3))
  nnx_traces = []

  @nnx.jit
  def nnx_step(model, optimizer):
    nnx_traces.append(1)
    optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))

  nnx_step(model, optimizer)
  optimizer.opt_state[0].hyperparams["max_norm"].value = jnp.asarray(
      0.5, jnp.float32)
  nnx_step(model, optimizer)
  assert len(nnx_traces) == 1
  stats = oc.clip_stats(optimizer.opt_state)
  assert float(stats["clip_by_global_norm/threshold"]) == 0.5

"""The step guard's two spike rules on the stability benchmark's LSTM.

``python -m benchmarks.skip_rules_lstm`` (from the repository root; a few
minutes on CPU) trains ``skip_step(chain(zclip(), sgd))`` with the moving-
average rule (``rule=oc.SpikeEMA(max_ratio=5)``), with the rolling rule
(``rule=oc.SpikeWindow()``, the loss passed to ``update``) and with
neither, at learning rates 0.03 and 0.3, two seeds, and prints each run's
final validation MSE and the share of steps skipped. The last CPU run is in
``benchmarks/results/skip-rules-lstm-cpu.txt``, measured before 0.4 renamed
the rules' arguments: its rows ``spike_factor=5`` and
``spike_window=SpikeWindow()`` are the rows ``rule=SpikeEMA(max_ratio=5)``
and ``rule=SpikeWindow()`` here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc
from benchmarks import _stability_tasks as tasks_mod


def run(task, tx, lrs, seeds, steps):
  def one(lr, seed, data):
    params = task.init(jax.random.fold_in(jax.random.key(0), seed))
    data_key = jax.random.fold_in(jax.random.key(1), seed)
    state = tx.init(params)
    grad = jax.value_and_grad(task.loss, has_aux=True)

    def step(carry, t):
      params, state = carry
      (loss, _), grads = grad(params, data, data_key, t)
      updates, state = tx.update(grads, state, params, loss=loss)
      factor = -lr * task.schedule(t, steps)
      params = jax.tree.map(lambda p, u: p + factor * u, params, updates)
      return (params, state), state.skipped

    (params, state), skipped = jax.lax.scan(step, (params, state),
                                            jnp.arange(steps))
    final, _ = task.evaluate(params, data)
    return final, skipped.mean()

  lr = jnp.repeat(jnp.asarray(lrs, jnp.float32), seeds)
  seed = jnp.tile(jnp.arange(seeds), len(lrs))
  final, frac = jax.jit(jax.vmap(one, in_axes=(0, 0, None)))(lr, seed,
                                                             task.data)
  return np.asarray(final).reshape(len(lrs), seeds), np.asarray(frac).reshape(
      len(lrs), seeds)


def main():
  task = tasks_mod.lstm()
  steps = task.steps if hasattr(task, "steps") else 500
  lrs, seeds = [0.03, 0.3], 2
  warm = min(25, max(steps // 8, 1))
  def zclipped():
    return optax.chain(oc.zclip(oc.ZScore(warmup_steps=warm)),
                       task.optimizer())

  rules = {
      "rule=SpikeEMA(max_ratio=5)": oc.skip_step(
          zclipped(), rule=oc.SpikeEMA(max_ratio=5.0)),
      "rule=SpikeWindow()": oc.skip_step(zclipped(), rule=oc.SpikeWindow()),
      "no guard": zclipped(),
  }
  for name, tx in rules.items():
    if name == "no guard":
      tx = oc.skip_step(tx, nonfinite=False, skip_norm=float("inf"))
    final, frac = run(task, tx, lrs, seeds, steps)
    for i, lr in enumerate(lrs):
      print(f"{name:30s} lr={lr:<5g} final MSE per seed {final[i]}"
            f"  skipped {100 * frac[i]}%", flush=True)


if __name__ == "__main__":
  main()

"""Checkpointing: save mid-run with Orbax, restore in a fresh process, go on.

The continued run must equal the uninterrupted one bit for bit: ZClip's EMA
and warm-up buffer, AutoClip's ring buffer, the historical update clip's
window, the step guards' counters, norm EMA and rolling window, and AdamW's
moments all survive the round trip.

Both runs happen in fresh processes, this file run as a script:
``python tests/test_checkpoint.py reference|continue CKPT_DIR OUT.pkl``.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))

import optaxclip as oc  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 14
SAVE_AT = 7
BAD_STEPS = (3, 10)  # A NaN batch before and after the checkpoint.


def make_optimizer() -> optax.GradientTransformation:
  clipped = optax.chain(
      oc.zclip(oc.ZScore(warmup_steps=3)),
      oc.clip_by_quantile(0.9, window=4),  # Wraps around before the save.
      oc.clip_update_rms(optax.adamw(1e-2)),
      oc.clip_update_by_history(window=4, min_history=2))
  # Both spike rules, one guard each: the outer one ("skip_step") skips the
  # NaN steps; its rolling window wraps around before the save, and so high
  # a bound skips no finite step. The inner one ("skip_step#1") keeps an EMA
  # of the norms.
  guarded = oc.skip_step(
      oc.skip_step(clipped, rule=oc.SpikeEMA(max_ratio=50.0,
                                             warmup_steps=2)),
      rule=oc.SpikeWindow(window=4, num_std=1e3, min_history=2))
  return optax.chain(oc.clip_by_value(100.0), guarded)


def init_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w": jax.random.normal(k1, (8, 4)), "b": jnp.zeros(4),
          "emb": jax.random.normal(k2, (5, 3)).astype(jnp.bfloat16)}


def loss_fn(params, step):
  key = jax.random.fold_in(jax.random.PRNGKey(1), step)
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (16, 8))
  y = jax.random.normal(ky, (16, 4))
  scale = jnp.where(step % 5 == 4, 30.0, 1.0)  # Norm spikes for the clippers.
  pred = x @ params["w"] + params["b"]
  reg = jnp.sum(jnp.square(params["emb"].astype(jnp.float32)))
  loss = scale * jnp.mean(jnp.square(pred - y)) + 0.1 * reg
  bad = jnp.isin(step, jnp.array(BAD_STEPS))
  return loss * jnp.where(bad, jnp.nan, 1.0)  # NaN gradients at bad steps.


def train(params, opt_state, first, last):
  opt = make_optimizer()

  @jax.jit
  def step(params, opt_state, i):
    loss, grads = jax.value_and_grad(loss_fn)(params, i)
    updates, opt_state = opt.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state

  for i in range(first, last):
    params, opt_state = step(params, opt_state, jnp.int32(i))
  return params, opt_state


def flat(tree):
  """``{path: NumPy array}`` of every leaf (bfloat16 kept, unlike .npz)."""
  return {jax.tree_util.keystr(path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def run_reference(ckpt_dir, out):
  """The uninterrupted run, saving a checkpoint at ``SAVE_AT`` on the way."""
  import orbax.checkpoint as ocp

  params = init_params()
  mid_params, mid_state = train(params, make_optimizer().init(params), 0,
                                SAVE_AT)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(Path(ckpt_dir).resolve(),
              {"params": mid_params, "opt_state": mid_state})
  params, opt_state = train(mid_params, mid_state, SAVE_AT, STEPS)
  stats = {k: np.asarray(v) for k, v in oc.clip_stats(opt_state).items()}
  stats["mid/skip_step/num_skipped"] = np.asarray(
      oc.clip_stats(mid_state)["skip_step/num_skipped"])
  _dump(out, {"params": params, "opt_state": opt_state}, stats)


def run_continued(ckpt_dir, out):
  """A fresh process: restore the checkpoint and train to the end."""
  import orbax.checkpoint as ocp

  params = init_params()
  target = {"params": params, "opt_state": make_optimizer().init(params)}
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(Path(ckpt_dir).resolve(), abstract)
  params, opt_state = train(restored["params"], restored["opt_state"],
                            SAVE_AT, STEPS)
  _dump(out, {"params": params, "opt_state": opt_state}, {})


def _dump(out, tree, stats):
  with open(out, "wb") as f:
    pickle.dump({"leaves": flat(tree), "stats": stats}, f)


def _run_script(mode, ckpt_dir, out):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
      [sys.executable, __file__, mode, str(ckpt_dir), str(out)], env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out, "rb") as f:
    return pickle.load(f)


def test_restore_in_fresh_process_continues_bit_identically(tmp_path):
  ckpt_dir = tmp_path / "ckpt"
  reference = _run_script("reference", ckpt_dir, tmp_path / "reference.pkl")
  continued = _run_script("continue", ckpt_dir, tmp_path / "continued.pkl")

  # The run exercised what it should: skips on both sides of the save, a
  # wrapped ring buffer, ZClip past its warm-up.
  stats = reference["stats"]
  assert int(stats["mid/skip_step/num_skipped"]) == 1
  assert int(stats["skip_step/num_skipped"]) == len(BAD_STEPS)
  assert int(stats["skip_step#1/num_skipped"]) == 0  # The outer one did.
  assert float(stats["skip_step#1/norm_ema"]) > 0
  assert int(stats["clip_by_quantile/count"]) == STEPS - len(BAD_STEPS)
  assert int(stats["clip_by_quantile/fill"]) == 4
  assert int(stats["zclip/num_clipped"]) > 0
  assert np.isfinite(stats["skip_step/loss_threshold"])
  assert int(stats["clip_update_by_history/fill"]) == 4  # Wrapped around.
  assert int(stats["clip_update_rms/count"]) == STEPS - len(BAD_STEPS)

  want, got = reference["leaves"], continued["leaves"]
  assert sorted(got) == sorted(want)
  for name, ref in want.items():
    assert got[name].dtype == ref.dtype, name
    assert got[name].shape == ref.shape, name
    assert got[name].tobytes() == ref.tobytes(), name


if __name__ == "__main__":
  {"reference": run_reference, "continue": run_continued}[sys.argv[1]](
      sys.argv[2], sys.argv[3])

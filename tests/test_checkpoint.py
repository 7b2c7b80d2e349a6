"""Checkpointing: save mid-run with Orbax, restore in a fresh process, go on;
and switch a running job's optimizer to optaxclip and back.

The continued run must equal the uninterrupted one bit for bit: ZClip's EMA
and warm-up buffer, AutoClip's ring buffer, the historical update clip's
window, the step guards' counters, norm EMA and rolling window, and AdamW's
moments all survive the round trip.

Both runs happen in fresh processes, this file run as a script:
``python tests/test_checkpoint.py reference|continue CKPT_DIR OUT.pkl``.

The switch: a checkpoint written with optax's clipper (or no guard)
restores with its own optimizer's state as the target, and
``oc.adopt_state`` carries it into the new chain (optaxclip's clipper,
``skip_step`` around the optimizer), and back: every state present on both
sides bit for bit, the others fresh; for a plain chain, ``MultiSteps`` and
an ``nnx.Optimizer``.
"""

import functools
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


@pytest.mark.slow
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


# -- Switching a running job's optimizer -------------------------------------

SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 50)


def _adamw():
  return optax.adamw(SCHEDULE, weight_decay=1e-2)


SWITCHES = {
    # name: (old optimizer, new optimizer), the new one guarded and clipped
    # by optaxclip, the old one as a job written for optax has it.
    "chain": (lambda: optax.chain(optax.clip_by_global_norm(1.0), _adamw()),
              lambda: oc.skip_step(optax.chain(
                  oc.clip_by_global_norm(1.0, leaf_norms=True), _adamw()),
                                   rule=oc.SpikeEMA())),
    "no guard": (lambda: _adamw(),
                 lambda: oc.skip_step(optax.chain(oc.zclip(), _adamw()))),
    "multisteps": (
        lambda: optax.MultiSteps(optax.chain(
            optax.clip_by_global_norm(1.0), _adamw()), 3),
        lambda: oc.skip_step(optax.MultiSteps(optax.chain(
            oc.clip_by_global_norm(1.0), _adamw()), 3))),
}


def _params():
  return {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}


def _train(opt, state, steps, first=0):
  """``steps`` updates of ``opt`` from ``state``; step ``i``'s gradients
  are ``3 cos((i + 1) params)``."""
  update = _stepper(opt)
  for i in range(first, first + steps):
    state = update(state, jnp.float32(i))
  return state


@functools.cache
def _stepper(opt):
  """One jitted update of ``opt`` (compiled once per optimizer)."""
  params = _params()

  @jax.jit
  def update(state, i):
    grads = jax.tree_util.tree_map(lambda p: jnp.cos(p * (i + 1)) * 3,
                                   params)
    return opt.update(grads, state, params)[1]

  return update


def _orbax_round_trip(path, state, target):
  import orbax.checkpoint as ocp

  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state)
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(path, abstract)


def _states(tree):
  """Every optimizer state record in ``tree``, with its path."""
  is_state = lambda x: isinstance(x, tuple) and hasattr(x, "_fields")  # noqa: E731
  return [(jax.tree_util.keystr(p), x)
          for p, x in jax.tree_util.tree_leaves_with_path(
              tree, is_leaf=lambda x: is_state(x) and not (
                  hasattr(x, "inner_state") or hasattr(x, "inner_opt_state")))
          if is_state(x)]


def assert_carried(adopted, old, fresh):
  """Each leaf state of ``adopted`` equals, bit for bit, the state of the
  same type and structure in ``old`` when there is one (in order), else the
  fresh one."""
  pool = [x for _, x in _states(old)]
  carried = 0
  for (at, got), (_, new) in zip(_states(adopted), _states(fresh)):
    same = [x for x in pool if type(x) is type(got) and (
        jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(got))]
    want = same[0] if same and jax.tree_util.tree_leaves(got) else new
    if same:
      pool.remove(same[0])
    carried += want is not new and bool(jax.tree_util.tree_leaves(want))
    for a, b in zip(jax.tree_util.tree_leaves(got),
                    jax.tree_util.tree_leaves(want)):
      assert np.asarray(a).dtype == np.asarray(b).dtype, at
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), at
  return carried


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_switch_to_optaxclip_and_back_with_orbax(name, tmp_path):
  make_old, make_new = SWITCHES[name]
  old, new = make_old(), make_new()
  params = _params()
  # The job ran 5 steps with the old optimizer and wrote its checkpoint.
  written = _train(old, old.init(params), 5)
  # The new optimizer's target refuses it: its tree differs.
  with pytest.raises(Exception, match="(?i)tree|structure|match"):
    _orbax_round_trip(tmp_path / "direct", written, new.init(params))
  # Restored with its own optimizer's state as the target, then adopted.
  restored = _orbax_round_trip(tmp_path / "old", written, old.init(params))
  adopted = oc.adopt_state(restored, init_state=new.init(params))
  assert jax.tree_util.tree_structure(adopted) == (
      jax.tree_util.tree_structure(new.init(params)))
  assert assert_carried(adopted, written, new.init(params)) >= 1
  if name == "multisteps":  # Behind skip_step, MultiSteps' counters read on.
    assert int(adopted.mini_step) == 2 and int(adopted.gradient_step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(adopted.acc_grads),
                    jax.tree_util.tree_leaves(written.acc_grads)):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  # The job goes on with the new optimizer; then switches back.
  going = _train(new, adopted, 4, first=5)
  restored = _orbax_round_trip(tmp_path / "new", going, new.init(params))
  back = oc.adopt_state(restored, init_state=old.init(params))
  assert assert_carried(back, going, old.init(params)) >= 1
  _train(old, back, 1, first=9)


@pytest.mark.slow
def test_switch_an_nnx_optimizer_with_orbax(tmp_path):
  nnx = pytest.importorskip("flax.nnx")
  x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)

  make_old, make_new = SWITCHES["chain"]
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_old(), wrt=nnx.Param)
  for _ in range(3):
    step(model, optimizer)
  # A fresh job: the old optimizer's state is the target, then adopted.
  model2 = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
  old = nnx.Optimizer(model2, make_old(), wrt=nnx.Param)
  restored = _orbax_round_trip(
      tmp_path / "ckpt", {"model": nnx.state(model), "opt": nnx.state(
          optimizer)}, {"model": nnx.state(model2), "opt": nnx.state(old)})
  nnx.update(model2, restored["model"])
  nnx.update(old, restored["opt"])
  new = nnx.Optimizer(model2, make_new(), wrt=nnx.Param)
  fresh = new.opt_state
  new.opt_state = oc.adopt_state(old.opt_state, init_state=new.opt_state)
  assert assert_carried(new.opt_state, optimizer.opt_state, fresh) == 2
  assert int(new.opt_state.inner_state[1][0].count) == 3  # AdamW's.
  step(model2, new)
  assert int(oc.clip_stats(new.opt_state)["skip_step/count"]) == 1
  assert int(new.opt_state.inner_state[1][0].count) == 4


def test_adopt_state_matches_by_type_and_order():
  # Without Orbax: a chain whose middle link changed keeps both ends; a
  # window resized starts afresh; nothing in common raises.
  params = _params()
  old = optax.chain(oc.clip_by_quantile(0.9, window=4), optax.adam(0.1),
                    optax.scale_by_schedule(SCHEDULE))
  new = optax.chain(oc.clip_by_quantile(0.9, window=8), oc.zclip(),
                    optax.adam(0.1), optax.scale_by_schedule(SCHEDULE))
  state, fresh = old.init(params), new.init(params)
  adopted = oc.adopt_state(state, init_state=fresh)
  assert adopted[0] is fresh[0] and adopted[1] is fresh[1]
  assert adopted[2] is state[1] and adopted[3] is state[2]
  with pytest.raises(ValueError, match="no part of opt_state fits"):
    oc.adopt_state(state, init_state=optax.sgd(0.1, momentum=0.9).init(
        {"z": jnp.ones(5)}))


def test_code_reading_multisteps_counters_works_behind_skip_step():
  # nanodo reads opt_state.gradient_step, .mini_step, .acc_grads.
  params = _params()
  inner = optax.MultiSteps(optax.adam(0.1), 3)
  opt = oc.skip_step(inner)
  state = _train(opt, opt.init(params), 4)
  # Four micro-steps of three: one step taken, the fourth gradients
  # (3 cos(4 params)) in the accumulator.
  assert int(state.gradient_step) == 1 and int(state.mini_step) == 1
  for a, p in zip(jax.tree_util.tree_leaves(state.acc_grads),
                  jax.tree_util.tree_leaves(params)):
    np.testing.assert_allclose(a, np.cos(np.asarray(p, np.float64) * 4) * 3,
                               rtol=1e-6)
  assert not bool(inner.has_updated(state))
  assert state[0] is state.stats  # Indexing stays the NamedTuple's.
  with pytest.raises(AttributeError, match="nor has its inner_state"
                     r" \(MultiStepsState\)"):
    _ = state.no_such_field
  assert not hasattr(state, "__array__")


def test_clip_stats_of_multisteps_before_its_first_real_step():
  # MultiSteps keeps the clipper's fresh state until its k-th micro-step;
  # clip_stats reads it all along, and then the norm of the mean gradient.
  params = _params()
  opt = optax.MultiSteps(optax.chain(oc.clip_by_global_norm(
      1.0, leaf_norms=True), optax.sgd(0.1)), 3)
  state = opt.init(params)
  for steps in range(4):
    stats = oc.clip_stats(state, scalars=True)
    assert int(stats["clip_by_global_norm/count"]) == (steps == 3)
    assert set(stats) >= {"clip_by_global_norm/leaf_norms/w",
                          "clip_by_global_norm/leaf_norms/b"}
    if steps < 3:
      assert float(stats["clip_by_global_norm/norm"]) == 0.0
      state = _train(opt, state, 1, first=steps)
  mean = [np.mean([np.cos(np.asarray(p, np.float64) * (i + 1)) * 3
                   for i in range(3)], axis=0)
          for p in jax.tree_util.tree_leaves(params)]
  np.testing.assert_allclose(stats["clip_by_global_norm/norm"],
                             np.sqrt(sum(np.sum(m ** 2) for m in mean)),
                             rtol=1e-6)

if __name__ == "__main__":
  {"reference": run_reference, "continue": run_continued}[sys.argv[1]](
      sys.argv[2], sys.argv[3])

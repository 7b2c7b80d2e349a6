"""Clipping across pipeline stages that run as separate programs.

Two JAX processes (``jax.distributed.initialize`` on localhost, CPU
collectives over gloo) each hold half of a model's layers and their own
optimizer, ``oc.skip_step(chain(oc.clip_by_global_norm(1.0), adamw))``. The
embedding is tied: both stages hold it (its gradient already summed over
the two uses, as a pipeline does), and only the first stage counts it in the
norm (``mask=`` on ``oc.norm_parts``). Every step, the stages

1. exchange the largest element of their gradients (one scalar each),
2. make their partial norms on that common peak (``oc.norm_parts``),
3. exchange them (``jax.experimental.multihost_utils.process_allgather``)
   and merge them (``+``): exact integer sums, so the merged norm is the
   bits one program would compute for the whole model,
4. clip and skip with that norm: ``opt.update(grads, state, params,
   global_norm=parts)`` (``skip_step`` judges it and passes it on to the
   clipper): every stage decides alike.

The stages' updates, put together, equal those of one program that holds
the whole model, bit for bit, skipped steps included.

Run:
  python examples/pipeline_two_programs.py

Each worker runs this file with ``--process-id``; the launcher picks a free
port, starts both, and kills them if one fails or they run past
``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
try:  # Run from a checkout without installing: import the package beside us.
  import optaxclip  # noqa: F401
except ImportError:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import optaxclip as oc  # noqa: E402

NUM_STAGES = 2
STEPS = 6
SPIKE_STEP = 3  # Its gradients are 1000 times larger: the step is skipped.
WIDTH, VOCAB = 16, 24
# The layers of each stage; "emb" (tied: the input embedding of stage 0 and
# the output projection of stage 1) is held by both.
STAGES = (("emb", "l0", "l1"), ("l2", "l3", "emb"))
COUNTS_TIED = 0  # The stage that counts the tied weight in the norm.


SKIP_NORM = 1e3


def make_optimizer() -> optax.GradientTransformationExtraArgs:
  return oc.skip_step(
      optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-2)),
      skip_norm=SKIP_NORM)


def guarded_update(opt, grads, state, params, parts):
  """``opt``'s update by the norm ``parts``: the updates, the state, whether
  the step was skipped and the norm it was judged by."""
  updates, state = opt.update(grads, state, params, global_norm=parts)
  return updates, state, state.skipped, state.stats.norm


def init_params() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  params = {"emb": rng.normal(size=(VOCAB, WIDTH)).astype(np.float32)}
  for i in range(4):
    params[f"l{i}"] = {
        "w": (rng.normal(size=(WIDTH, WIDTH)) / 4).astype(np.float32),
        "b": np.zeros(WIDTH, np.float32)}
  return params


def gradients(step: int) -> dict[str, Any]:
  """The whole model's gradients at ``step`` (as the backward pass would
  give them; the tied embedding's already summed over both uses)."""
  rng = np.random.default_rng(100 + step)
  scale = 1000.0 if step == SPIKE_STEP else 1.0 / (step + 1)
  return jax.tree.map(
      lambda p: (rng.normal(size=p.shape) * scale).astype(np.float32),
      init_params())


def stage_tree(tree: dict[str, Any], stage: int) -> dict[str, Any]:
  return {k: tree[k] for k in STAGES[stage]}


def counted(stage: int) -> dict[str, bool]:
  """The ``mask=`` of a stage's partial norm: the tied weight counts once."""
  return {k: k != "emb" or stage == COUNTS_TIED for k in STAGES[stage]}


# ----------------------------------------------------------------------------
# One program, the whole model: the reference.


def run_one_program(steps: int = STEPS) -> list[dict[str, Any]]:
  """Every step's updates of the whole model, and the skip flags."""
  opt = make_optimizer()
  params = jax.tree.map(jnp.asarray, init_params())
  state = opt.init(params)

  @jax.jit
  def step(params, state, grads):
    parts = oc.norm_parts(grads)
    updates, state, skip, norm = guarded_update(opt, grads, state, params,
                                                parts)
    return optax.apply_updates(params, updates), state, updates, skip, norm

  out = []
  for t in range(steps):
    params, state, updates, skip, norm = step(params, state, gradients(t))
    out.append({"updates": jax.tree.map(np.asarray, updates),
                "skipped": bool(skip), "norm": np.asarray(norm),
                "clipped_norm": np.asarray(state.inner_state[0].stats.norm)})
  return out


# ----------------------------------------------------------------------------
# Two programs, one stage each.


def run_stage(stage: int, exchange, steps: int = STEPS
              ) -> list[dict[str, Any]]:
  """One stage's steps; ``exchange(x)`` gathers ``x`` from every stage (a
  leading axis, one row per stage)."""
  opt = make_optimizer()
  params = stage_tree(jax.tree.map(jnp.asarray, init_params()), stage)
  state = opt.init(params)
  mask = counted(stage)

  @jax.jit
  def peak(grads):
    return oc.norm_parts(grads, ord=np.inf, mask=mask).peak

  @jax.jit
  def parts(grads, top):
    return oc.norm_parts(grads, mask=mask, peak=top)

  @jax.jit
  def step(params, state, grads, parts):
    updates, state, skip, norm = guarded_update(opt, grads, state, params,
                                                parts)
    return optax.apply_updates(params, updates), state, updates, skip, norm

  out = []
  for t in range(steps):
    grads = stage_tree(gradients(t), stage)
    top = jnp.max(jnp.asarray(exchange(peak(grads))))  # 1. the common peak
    mine = parts(grads, top)  # 2. this stage's partial norm
    total = exchange(mine).merge_stacked()  # 3. every stage's, merged
    params, state, updates, skip, norm = step(params, state, grads,
                                              total)  # 4.
    out.append({"updates": jax.tree.map(np.asarray, updates),
                "skipped": bool(skip), "norm": np.asarray(norm),
                "clipped_norm": np.asarray(state.inner_state[0].stats.norm)})
  return out


def worker(stage: int, port: int, out_dir: Path, steps: int) -> None:
  from jax.experimental import multihost_utils

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"localhost:{port}", num_processes=NUM_STAGES,
      process_id=stage, local_device_ids=[0])
  try:
    out = run_stage(stage, multihost_utils.process_allgather, steps)
    flat = {}
    for t, r in enumerate(out):
      flat[f"{t}/skipped"] = np.asarray(r["skipped"])
      flat[f"{t}/norm"] = r["norm"]
      flat[f"{t}/clipped_norm"] = r["clipped_norm"]
      for path, v in jax.tree_util.tree_leaves_with_path(r["updates"]):
        flat[f"{t}/updates{jax.tree_util.keystr(path)}"] = v
    np.savez(out_dir / f"stage{stage}.npz", **flat)
  finally:
    jax.distributed.shutdown()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(out_dir: Path, steps: int = STEPS, timeout: float = 120.0
           ) -> list[dict[str, np.ndarray]]:
  """Runs both stages to completion; returns each one's results. Raises
  ``RuntimeError`` (after killing both) when one fails or times out."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if "xla_force_host_platform_device_count" not in f)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  port = free_port()
  logs = [open(out_dir / f"stage{i}.log", "w+") for i in range(NUM_STAGES)]
  procs = [subprocess.Popen(
      [sys.executable, __file__, "--process-id", str(i), "--port", str(port),
       "--out", str(out_dir), "--steps", str(steps)],
      env=env, stdout=logs[i], stderr=subprocess.STDOUT)
      for i in range(NUM_STAGES)]
  try:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline:
        raise RuntimeError(f"stages still running after {timeout} s")
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.1)
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
      raise RuntimeError(f"stage(s) {failed} failed")
  except RuntimeError as e:
    tails = []
    for i, log in enumerate(logs):
      log.seek(0)
      tails.append(f"--- stage {i} ---\n" + log.read()[-3000:])
    raise RuntimeError(f"{e}\n" + "\n".join(tails)) from None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for log in logs:
      log.close()
  return [dict(np.load(out_dir / f"stage{i}.npz")) for i in range(NUM_STAGES)]


def compare(stages: list[dict[str, np.ndarray]],
            reference: list[dict[str, Any]]) -> int:
  """Asserts that the stages' updates, put together, are the reference's
  bit for bit; returns how many values were compared."""
  compared = 0
  for t, ref in enumerate(reference):
    for stage, got in enumerate(stages):
      assert bool(got[f"{t}/skipped"]) == ref["skipped"], (t, stage)
      np.testing.assert_array_equal(got[f"{t}/norm"], ref["norm"])
      np.testing.assert_array_equal(got[f"{t}/clipped_norm"],
                                    ref["clipped_norm"])
      mine = stage_tree(ref["updates"], stage)
      for path, v in jax.tree_util.tree_leaves_with_path(mine):
        np.testing.assert_array_equal(
            got[f"{t}/updates{jax.tree_util.keystr(path)}"], v,
            err_msg=f"step {t}, stage {stage}, {jax.tree_util.keystr(path)}")
        compared += 1
  return compared


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--port", type=int, default=None)
  parser.add_argument("--out", type=Path, default=None)
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--timeout", type=float, default=120.0)
  args = parser.parse_args()
  if args.process_id is not None:
    worker(args.process_id, args.port, args.out, args.steps)
    return
  with tempfile.TemporaryDirectory() as tmp:
    start = time.monotonic()
    stages = launch(Path(args.out or tmp), args.steps, args.timeout)
    elapsed = time.monotonic() - start
  reference = run_one_program(args.steps)
  compared = compare(stages, reference)
  skipped = [t for t, r in enumerate(reference) if r["skipped"]]
  print(f"{NUM_STAGES} programs, {args.steps} steps, {elapsed:.1f} s: every"
        f" update equal to one program's, bit for bit ({compared} arrays);"
        f" skipped steps {skipped}; norms"
        f" {[float(r['norm']) for r in reference]}")


if __name__ == "__main__":
  main()

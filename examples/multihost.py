"""Clipping in multi-process training: 2 processes on localhost, one model.

Starts two JAX processes (``jax.distributed.initialize`` with CPU collectives,
two CPU devices each), shards a small MLP FSDP-style over the four devices (the
batch along the same axis), and trains it with optaxclip clippers chained into
AdamW. Every process ends with the parameters and the per-step clip
statistics; the script checks that both processes agree with each other and
with the same training run on a single device.

Run:
  python examples/multihost.py

Each worker process runs this file with ``--process-id``; the launcher picks a
free port, starts the workers, and kills them if anything fails or they run
past ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optaxclip as oc  # noqa: E402

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
STEPS = 8
SPIKE_STEP = 5  # A batch with outlier targets: its gradient norm spikes.
BATCH, D_IN, D_HIDDEN, D_OUT = 32, 8, 32, 4
AXIS = "fsdp"


def optimizers() -> dict[str, Callable[[], Any]]:
  """The optimizers trained, by name."""
  return {
      "clip_by_global_norm": lambda: optax.chain(
          oc.clip_by_global_norm(1.0), optax.adamw(5e-2, weight_decay=1e-4)),
      "zclip": lambda: optax.chain(
          oc.zclip(oc.ZScore(warmup_steps=3)),
          optax.adamw(5e-2, weight_decay=1e-4)),
  }


# ----------------------------------------------------------------------------
# The model and its training, identical on one device and on many.


def data(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-step batches of a regression with large targets and one outlier batch."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(steps, BATCH, D_IN)).astype(np.float32)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  y = 10.0 * np.tanh(x @ w) + rng.normal(size=(steps, BATCH, D_OUT))
  y[SPIKE_STEP:SPIKE_STEP + 1] *= 20.0
  return x, y.astype(np.float32)


def init_params() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(1)
  return {
      "w1": (rng.normal(size=(D_IN, D_HIDDEN)) / np.sqrt(D_IN)).astype(np.float32),
      "b1": np.zeros(D_HIDDEN, np.float32),
      "w2": (rng.normal(size=(D_HIDDEN, D_OUT)) / np.sqrt(D_HIDDEN)).astype(np.float32),
      "b2": np.zeros(D_OUT, np.float32),
  }


def fsdp_spec(shape: tuple[int, ...], size: int) -> Any:
  """Shards a leaf along its largest axis that the mesh size divides."""
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % size == 0:
      return P(*[AXIS if a == axis else None for a in range(len(shape))])
  return P()


def train(devices: list[Any], make_opt: Callable[[], Any], steps: int
          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Trains on a 1-D mesh over ``devices``; returns params and per-step stats.

  Works the same in one process and across processes: global arrays are
  built with ``jax.make_array_from_callback`` (each process fills its own
  shards) and read back replicated.
  """
  mesh = Mesh(np.array(devices), (AXIS,))

  def put(value, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(value.shape, sharding,
                                        lambda index: value[index])

  params = {k: put(v, fsdp_spec(v.shape, mesh.size))
            for k, v in init_params().items()}
  xs, ys = data(steps)
  opt = make_opt()

  def loss_fn(params, x, y):
    h = jax.nn.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  replicated = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))
  opt_state = jax.jit(opt.init)(params)
  history: dict[str, list[np.ndarray]] = {"loss": []}
  for t in range(steps):
    x = put(xs[t], P(AXIS, None))
    y = put(ys[t], P(AXIS, None))
    params, opt_state, loss = step(params, opt_state, x, y)
    for key, value in {"loss": loss, **oc.clip_stats(opt_state)}.items():
      if jnp.ndim(value) == 0:
        history.setdefault(key, []).append(np.asarray(replicated(value)))
  final = {k: np.asarray(v) for k, v in replicated(params).items()}
  return final, {k: np.stack(v) for k, v in history.items()}


def run_all(devices: list[Any], steps: int) -> dict[str, np.ndarray]:
  """Every optimizer's final params and stats, flattened to one dict."""
  out = {}
  for name, make_opt in optimizers().items():
    params, stats = train(devices, make_opt, steps)
    out.update({f"{name}/params/{k}": v for k, v in params.items()})
    out.update({f"{name}/stats/{k}": v for k, v in stats.items()})
  return out


# ----------------------------------------------------------------------------
# Processes.


def worker(process_id: int, port: int, out_dir: Path, steps: int) -> None:
  """One of the processes: joins the others, trains, saves its results."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"localhost:{port}", num_processes=NUM_PROCESSES,
      process_id=process_id, local_device_ids=list(range(DEVICES_PER_PROCESS)))
  try:
    assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS
    results = run_all(jax.devices(), steps)
    np.savez(out_dir / f"process{process_id}.npz", **results)
  finally:
    jax.distributed.shutdown()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(out_dir: Path, steps: int = STEPS, timeout: float = 100.0
           ) -> list[dict[str, np.ndarray]]:
  """Runs the worker processes to completion; returns each one's results.

  Raises ``RuntimeError`` (after killing every worker) when one fails or the
  run takes longer than ``timeout`` seconds.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(
      flags + [f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"])
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  port = free_port()
  logs = [open(out_dir / f"process{i}.log", "w+") for i in range(NUM_PROCESSES)]
  procs = [
      subprocess.Popen(
          [sys.executable, __file__, "--process-id", str(i), "--port", str(port),
           "--out", str(out_dir), "--steps", str(steps)],
          env=env, stdout=logs[i], stderr=subprocess.STDOUT)
      for i in range(NUM_PROCESSES)
  ]
  try:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline:
        raise RuntimeError(f"workers still running after {timeout} s")
      if any(p.poll() not in (None, 0) for p in procs):
        break  # One failed: the others would wait for it forever.
      time.sleep(0.1)
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
      raise RuntimeError(f"worker(s) {failed} failed")
  except RuntimeError as e:
    tails = []
    for i, log in enumerate(logs):
      log.seek(0)
      tails.append(f"--- process {i} ---\n" + log.read()[-3000:])
    raise RuntimeError(f"{e}\n" + "\n".join(tails)) from None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for log in logs:
      log.close()
  return [dict(np.load(out_dir / f"process{i}.npz"))
          for i in range(NUM_PROCESSES)]


def compare(results: list[dict[str, np.ndarray]],
            reference: dict[str, np.ndarray]) -> dict[str, float]:
  """Checks that processes agree exactly and match the reference closely.

  Returns the largest relative difference to the reference, per result.
  """
  first = results[0]
  for i, other in enumerate(results[1:], 1):
    assert other.keys() == first.keys(), f"process {i} has other results"
    for k in first:
      np.testing.assert_array_equal(other[k], first[k], err_msg=f"process {i}: {k}")
  assert first.keys() == reference.keys()
  worst = {}
  for k in first:
    if first[k].dtype == bool or np.issubdtype(first[k].dtype, np.integer):
      np.testing.assert_array_equal(first[k], reference[k], err_msg=k)
    else:
      np.testing.assert_allclose(first[k], reference[k], rtol=1e-4, atol=1e-5,
                                 err_msg=k)
    a, b = first[k].astype(np.float64), reference[k].astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf == inf, e.g. warm-up thresholds.
      rel = np.where(a == b, 0.0, np.abs(a - b) / np.maximum(np.abs(b), 1e-6))
    worst[k] = float(np.max(rel, initial=0))
  return worst


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--port", type=int, default=None)
  parser.add_argument("--out", type=Path, default=None)
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--timeout", type=float, default=100.0)
  args = parser.parse_args()
  if args.process_id is not None:
    worker(args.process_id, args.port, args.out, args.steps)
    return

  with tempfile.TemporaryDirectory() as tmp:
    start = time.monotonic()
    results = launch(Path(args.out or tmp), args.steps, args.timeout)
    elapsed = time.monotonic() - start

  reference = run_all(jax.devices()[:1], args.steps)
  worst = compare(results, reference)
  print(f"{NUM_PROCESSES} processes x {DEVICES_PER_PROCESS} CPU devices,"
        f" {args.steps} steps, {elapsed:.1f} s: both processes identical.")
  for name in optimizers():
    stats = {k.split("/")[-1]: v for k, v in results[0].items()
             if k.startswith(f"{name}/stats/")}
    diff = max(v for k, v in worst.items() if k.startswith(f"{name}/"))
    print(f"  {name}: loss {stats['loss'][0]:.3f} -> {stats['loss'][-1]:.3f},"
          f" clipped {int(stats['num_clipped'][-1])}/{args.steps} steps,"
          f" max relative difference to one device {diff:.1e}")


if __name__ == "__main__":
  main()

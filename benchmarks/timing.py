"""Interleaved timing of donated, jitted steps (and of torch steps).

All cases of one comparison run round-robin: each repetition times every case
once, in the same order, so that load from elsewhere on the machine falls on
all of them alike. Only the step itself is timed; the refill that restores the
inputs (so that every step really clips) runs outside the timer.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


@dataclasses.dataclass
class Case:
  """One thing to time.

  Attributes:
    name: what is timed, e.g. ``"optax.clip_by_global_norm"``.
    impl: ``"optaxclip"``, ``"optax"``, ``"torch"`` or ``"bound"``.
    setup: returns a fresh carry (the step's inputs).
    step: ``carry -> carry``; must not return before the work is done.
    refill: untimed ``carry -> carry`` run before every step, or ``None``.
    compiled: the compiled XLA executable, when there is one (for its memory
      analysis).
  """

  name: str
  impl: str
  setup: Callable[[], Any]
  step: Callable[[Any], Any]
  refill: Callable[[Any], Any] | None = None
  compiled: Any = None


def jax_case(name: str, impl: str, fn: Callable[..., tuple],
             setup: Callable[[], tuple], donate: Sequence[int],
             refill: Callable[[Any], Any] | None = None,
             compiler_options: dict[str, Any] | None = None) -> Case:
  """A case for ``fn(*carry) -> new values of the donated arguments``.

  ``fn`` is compiled here, ahead of timing, with donated buffers (and XLA's
  ``compiler_options``, if given).
  """
  donate = tuple(donate)
  first = [setup()]
  compiled = jax.jit(fn, donate_argnums=donate).lower(*first[0]).compile(
      compiler_options=compiler_options)

  def once():
    return first.pop() if first else setup()

  def step(carry):
    out = compiled(*carry)
    jax.block_until_ready(out)
    carry = list(carry)
    for i, o in zip(donate, out):
      carry[i] = o
    return tuple(carry)

  return Case(name, impl, once, step, refill, compiled)


def interleave(cases: Sequence[Case], reps: int, warmup: int,
               tick: Callable[[], None] = lambda: None,
               cpu: dict[str, list[float]] | None = None
               ) -> dict[str, list[float]]:
  """Times each case ``reps`` times, round-robin, after ``warmup`` rounds.

  Returns a dict from case name to the list of step times in seconds. If
  ``cpu`` is given, it also receives, per case, the CPU time this process
  (all its threads) spent in each step: unlike the wall time, that does not
  grow while other processes hold the cores.
  """
  carries = [c.setup() for c in cases]
  times: dict[str, list[float]] = {c.name: [] for c in cases}
  for r in range(warmup + reps):
    for i, c in enumerate(cases):
      carry = carries[i]
      if c.refill is not None:
        carry = c.refill(carry)
      c0 = time.process_time()
      t0 = time.perf_counter()
      carry = c.step(carry)
      dt = time.perf_counter() - t0
      dc = time.process_time() - c0
      carries[i] = carry
      if r >= warmup:
        times[c.name].append(dt)
        if cpu is not None:
          cpu.setdefault(c.name, []).append(dc)
    if r >= warmup:
      tick()
  del carries
  return times


def median(xs: Sequence[float]) -> float:
  return statistics.median(xs)


def compile_seconds(make_fn: Callable[[], Callable], args: Sequence[Any],
                    donate: Sequence[int], reps: int) -> tuple[float, Any]:
  """Median wall time to trace, lower and compile a fresh ``make_fn()``.

  Returns the median and the last compiled executable.
  """
  ts, compiled = [], None
  for _ in range(reps):
    fn = make_fn()  # A new function object each time: nothing is cached.
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=tuple(donate)).lower(*args).compile()
    ts.append(time.perf_counter() - t0)
  return median(ts), compiled


def temp_bytes(compiled: Any) -> int | None:
  """Scratch memory XLA allocates for one call, where the backend says."""
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend reports it.
    return None


def peak_device_bytes() -> int | None:
  """Peak bytes in use on the first device so far, where the backend says."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  if not stats:
    return None
  return stats.get("peak_bytes_in_use")

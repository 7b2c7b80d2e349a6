"""Float64 NumPy re-implementations of AutoClip and ZClip, driven by norms.

Each takes the sequence of pre-clip global norms and returns, step by step,
the threshold in force and the norm after clipping, computed from the
published algorithms with plain Python loops in float64. They share no code
with optaxclip.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Step(NamedTuple):
  threshold: float  # The threshold in force at this step.
  clipped_norm: float  # The norm after clipping.
  clipped: bool
  spike: bool = False
  mean: float = math.nan  # ZClip: the EMA statistics after the step.
  var: float = math.nan
  boundary: float = math.nan  # ZClip: the norm above which a step is a spike.


def gradient_with_norm(norm: float, direction: np.ndarray) -> np.ndarray:
  """``direction`` rescaled to the given 2-norm (float64)."""
  d = np.asarray(direction, np.float64)
  return d * (norm / np.linalg.norm(d))


def autoclip(norms, quantile: float, history: int) -> list[Step]:
  """AutoClip (Seetharaman et al. 2020) over a window of ``history`` norms.

  Each step appends its norm to the record (non-finite norms are left out),
  keeps the last ``history`` entries, and clips to ``np.quantile`` of them.
  """
  record: list[float] = []
  out = []
  for g in map(float, norms):
    if math.isfinite(g):
      record.append(g)
      record = record[-history:]
    t = float(np.quantile(np.array(record), quantile)) if record else math.inf
    out.append(_clip(g, t))
  return out


class ZClipReference:
  """ZClip (Kumar et al. 2025), following the authors' reference code.

  ``step(norm)`` returns the threshold in force (``max_norm``/``inf`` during
  warm-up, the clipping value on a spike, else the spike boundary, all capped
  by ``max_norm``) and the clipped norm. Non-finite norms are kept out of
  the warm-up buffer and the EMA.
  """

  def __init__(self, alpha=0.97, z_thresh=2.5, warmup_steps=25,
               max_norm=None, mode="adaptive", skip_update_on_spike=False,
               eps=1e-6):
    self.alpha, self.z_thresh, self.eps = alpha, z_thresh, eps
    self.warmup_steps, self.max_norm, self.mode = warmup_steps, max_norm, mode
    self.skip_update_on_spike = skip_update_on_spike
    self.buffer: list[float] = []
    self.mean: float | None = None
    self.var: float | None = None

  def step(self, g: float) -> Step:
    g = float(g)
    cap = math.inf if self.max_norm is None else float(self.max_norm)
    if self.mean is None:  # Warm-up.
      if math.isfinite(g):
        self.buffer.append(g)
      if len(self.buffer) >= self.warmup_steps:
        b = np.array(self.buffer)
        self.mean = float(b.mean())
        self.var = float(((b - self.mean) ** 2).mean())
      return _clip(g, cap, mean=self._m(), var=self._v())
    std = math.sqrt(self.var)
    clip_value = None
    if self.mode == "percentile":
      boundary = self.mean + self.z_thresh * std
      if g > boundary:
        clip_value = boundary
    else:
      boundary = self.mean + self.z_thresh * (std + self.eps)
      z = (g - self.mean) / (std + self.eps)
      if z > self.z_thresh:
        if self.mode == "adaptive":
          with np.errstate(divide="ignore", over="ignore"):  # eta may be inf.
            eta = np.float64(z) / np.float64(self.z_thresh)
          clip_value = float(self.mean + (self.z_thresh * std) / eta)
        else:
          clip_value = self.mean
    spike = clip_value is not None
    t = min(clip_value if spike else boundary, cap)
    if not (spike and self.skip_update_on_spike):
      v = clip_value if spike else g
      if math.isfinite(v):
        self.mean = self.alpha * self.mean + (1 - self.alpha) * v
        self.var = (self.alpha * self.var
                    + (1 - self.alpha) * (v - self.mean) ** 2)
    return _clip(g, t, spike=spike, mean=self.mean, var=self.var,
                 boundary=boundary)

  def _m(self):
    return math.nan if self.mean is None else self.mean

  def _v(self):
    return math.nan if self.var is None else self.var


def zclip(norms, **kwargs) -> list[Step]:
  ref = ZClipReference(**kwargs)
  return [ref.step(g) for g in norms]


def _clip(g: float, t: float, **extra) -> Step:
  over = g > t
  return Step(threshold=t, clipped_norm=t if over else g, clipped=over,
              **extra)


def spiky_norms(n: int, spikes: dict[int, float], seed: int = 0,
                base: float = 1.0, noise: float = 0.1,
                drift: float = 0.0) -> np.ndarray:
  """A noisy, slowly drifting norm sequence with planted spikes.

  ``spikes`` maps a step index to the factor that step's norm is multiplied by.
  """
  rng = np.random.default_rng(seed)
  norms = base * (1 + drift * np.arange(n) / n) * np.exp(
      noise * rng.standard_normal(n))
  for i, factor in spikes.items():
    norms[i] *= factor
  return norms

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
               eps=1e-6, std_floor=0.01):
    self.alpha, self.z_thresh, self.eps = alpha, z_thresh, eps
    self.std_floor = std_floor  # optaxclip's floor; 0 is the authors' rule.
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
    std = max(math.sqrt(self.var), self.std_floor * self.mean)
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


# ----------------------------------------------------------------------------
# AdaGC (Wang et al. 2025) and SPAM's spike rule (Huang et al. 2025).


class AdaGCStep(NamedTuple):
  scale: np.ndarray  # One factor per tensor.
  clipped_norms: np.ndarray  # Each tensor's norm after clipping.
  gamma: np.ndarray  # Each tensor's reference norm after the step.
  threshold: np.ndarray  # lambda_abs (warm-up) or lambda_rel * gamma_prev.


def adagc(norms, lambda_rel=1.05, beta=0.98, warmup_steps=100,
          lambda_abs=1.0, eps=0.0) -> list[AdaGCStep]:
  """AdaGC's Algorithm 1 in float64, driven by per-tensor norms.

  ``norms[t][i]`` is tensor ``i``'s norm at step ``t + 1``. Steps ``1 ..
  warmup_steps`` clip the global norm to ``lambda_abs`` and keep the running
  minimum of the clipped norms; later steps clip each tensor to ``lambda_rel
  * gamma_i`` and fold the clipped norm into ``gamma_i``'s EMA. Non-finite
  clipped norms leave ``gamma`` alone (a non-finite global norm, every
  ``gamma``, during warm-up).
  """
  norms = np.asarray(norms, np.float64)
  gamma = np.full(norms.shape[1], np.inf)
  out = []
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    for t, n in enumerate(norms, start=1):
      if t <= warmup_steps:
        total = math.sqrt(float(np.sum(n * n))) if np.all(np.isfinite(n)) \
            else (math.nan if np.any(np.isnan(n)) else math.inf)
        s = 1.0 if total <= lambda_abs else lambda_abs / total
        if math.isnan(total):
          s = math.nan
        scale = np.full_like(n, s)
        threshold = np.full_like(n, lambda_abs)
        kept = scale * n
        if math.isfinite(total):
          gamma = np.minimum(gamma, kept)
      else:
        threshold = lambda_rel * gamma
        scale = np.empty_like(n)
        for i in range(len(n)):
          if math.isnan(n[i]):
            scale[i] = math.nan
          elif n[i] + eps <= threshold[i] or n[i] == 0:
            scale[i] = 1.0
          else:
            scale[i] = threshold[i] / (n[i] + eps)
        kept = scale * n
        ok = np.isfinite(kept)
        gamma = np.where(ok, beta * gamma + (1 - beta) * kept, gamma)
      out.append(AdaGCStep(scale=scale, clipped_norms=kept,
                           gamma=gamma.copy(), threshold=threshold))
  return out


def spam_clip(grads, theta=5000.0, beta2=0.999):
  """SPAM's coordinate-wise spike clipping with its own EMA, in float64.

  ``grads`` is a sequence of arrays. At each step an element with ``g**2 >
  theta * v`` (``v`` the EMA of the clipped squares before the step) is
  replaced by ``sign(g) * sqrt(theta * v)``; elements with ``v == 0`` pass.
  Then ``v <- beta2 * v + (1 - beta2) * g_clipped**2`` where ``g_clipped`` is
  finite (``v`` is kept elsewhere). Returns the clipped
  arrays, the spike masks and ``v`` after each step.
  """
  v = None
  out = []
  for g in grads:
    g = np.asarray(g, np.float64)
    if v is None:
      v = np.zeros_like(g)
    clipped, mask = spike_rule(g, v, theta)
    with np.errstate(invalid="ignore", over="ignore"):
      new_v = beta2 * v + (1 - beta2) * clipped * clipped
    v = np.where(np.isfinite(clipped), new_v, v)  # NaN/Inf kept out of v.
    out.append((clipped, mask, v.copy()))
  return out


def spike_rule(g, v, theta):
  """One application of SPAM's rule against a given second moment ``v``."""
  g = np.asarray(g, np.float64)
  v = np.asarray(v, np.float64)
  out = g.copy()
  mask = np.zeros(g.shape, bool)
  for idx in np.ndindex(g.shape):
    if v[idx] > 0 and g[idx] * g[idx] > theta * v[idx]:
      mask[idx] = True
      out[idx] = math.copysign(math.sqrt(theta * v[idx]), g[idx])
  return out, mask


def autoclip_package(norms, quantile: float, history: int) -> list[Step]:
  """The ``autoclip`` package's ``QuantileClip``, in float64.

  The threshold is the quantile of the norms recorded before this step
  (``inf`` while none is), then the pre-clip norm is appended (non-finite
  ones are left out) and only the last ``history`` entries are kept.
  """
  record: list[float] = []
  out = []
  for g in map(float, norms):
    t = float(np.quantile(np.array(record), quantile)) if record else math.inf
    out.append(_clip(g, t))
    if math.isfinite(g):
      record = (record + [g])[-history:]
  return out

"""Float64 NumPy transcriptions of the published adaptive clipping rules.

Each rule is written from its reference code (read, then transcribed; no
code copied) and acts on a sequence of gradient norms, vectorised over
runs: ``norms`` has shape ``(runs, steps)``. Each function returns a dict of
``(runs, steps)`` arrays:

- ``threshold``: the norm above which the step is clipped (or skipped), as
  the reference computes it at that step (``inf`` where nothing can clip);
- ``clipped``: whether the reference clipped (or skipped) the step;
- ``scale``: the factor the gradient was multiplied by (0 for a skipped
  step).

The rules and their sources:

- :func:`zclip`: ZClip, ``zclip/zclip.py`` of
  https://github.com/bluorion-com/ZClip (class ``ZClip``; defaults
  ``alpha=0.97``, ``z_thresh=2.5``, ``eps=1e-6``, ``warmup_steps=25``,
  ``mode="zscore"``, ``clip_option="adaptive_scaling"``,
  ``clip_factor=1.0``, ``skip_update_on_spike=False``). The code's
  ``max_grad_norm=1.0`` cap, a fixed global clip on top of the adaptive
  one, is left out by default (``max_grad_norm=None``, as optaxclip's
  ``zclip()``): it is not the adaptive rule, and at a norm level above 1
  it would clip every step. The EMAs are fed the clip value on a spike,
  the norm otherwise (``_update_ema(clip_val if clip_val is not None else
  total_norm)``). Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM
  Pre-Training <https://arxiv.org/abs/2504.02507>`_, 2025.
- :func:`adagc`: AdaGC as released in the authors' Megatron patch,
  ``megatron-gpt2.patch`` of https://github.com/lishuai-97/AdaGC (class
  ``AdaGC`` in ``megatron/optimizer/clip_grads.py``; ``clip_ratio=1.04``,
  ``beta=0.99``, ``eps=1e-6``, ``start_clip_steps=100``, ``--clip-grad
  1.0`` in its run script). During the first ``start_clip_steps`` steps
  the gradients are clipped to global norm ``max_norm`` and each tensor's
  reference norm is the smallest clipped norm seen; then a tensor whose
  norm exceeds ``clip_ratio`` times its reference is scaled to it, and the
  reference's EMA is fed the *clipped* norm. The paper's Algorithm 1 has
  ``lambda_rel=1.05``, ``beta=0.98`` (pass them to compare). One tensor
  here: the gradient of the benchmark is one 100-float leaf. Wang et al.,
  `AdaGC: Improving Training Stability for Large Language Model
  Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025.
- :func:`autoclip`: AutoClip, the paper's code ``autoclip.py`` of
  https://github.com/pseeth/autoclip (``add_autoclip_gradient_handler``):
  every pre-clip norm since the start is kept, the current one appended
  before ``np.percentile(history, clip_percentile)`` is taken. Seetharaman
  et al., `AutoClip: Adaptive Gradient Clipping for Source Separation
  Networks <https://arxiv.org/abs/2007.14469>`_, 2020.
- :func:`autoclip_package`: the ``autoclip`` package's ``QuantileClip``
  with ``global_threshold=True`` (``autoclip/torch/quantile.py`` of the
  same repository; ``quantile=0.9``, ``history_length=1000``): the
  threshold is ``torch.quantile`` of the previous norms only (``inf`` on
  the first step), then the pre-clip norm is recorded.
- :func:`levanter_clip`: levanter's ``clip_update_by_historical_norm``
  (``src/levanter/optim/clip_update_norm.py`` of
  https://github.com/stanford-crfm/levanter; ``rolling_interval_length=128``,
  ``sigma_factor=3.0``): the threshold is ``mean + sigma_factor *
  max(std, 1e-6)`` of the last 128 *unclipped* norms (population
  deviation), in force once ``max(2, 128 // 2)`` norms are recorded.
  levanter applies it to the optimizer's update; here it reads the norm it
  is given.
- :func:`levanter_skip`: levanter's ``SkipStepConfig``
  (``src/levanter/optim/skipstep.py``; ``rolling_interval_length=128``,
  ``sigma_factor=6.0``), the gradient-norm half of its test: a step is
  skipped when its norm exceeds ``mean + 6 * max(std, 1e-6)`` of a window
  of the last 129 norms (``rolling_interval_length + 1``, skipped steps'
  included), once 64 are in it.
"""

from __future__ import annotations

import numpy as np


def _out(threshold: np.ndarray, clipped: np.ndarray, scale: np.ndarray
         ) -> dict[str, np.ndarray]:
  return {"threshold": threshold, "clipped": clipped, "scale": scale}


def zclip(norms: np.ndarray, *, alpha: float = 0.97, z_thresh: float = 2.5,
          eps: float = 1e-6, warmup_steps: int = 25, mode: str = "zscore",
          clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
          max_grad_norm: float | None = None) -> dict[str, np.ndarray]:
  """ZClip's ``step`` over ``norms`` ``(runs, steps)``.

  The recorded threshold is the clip value on a clipped step, else the
  norm above which the step would have been clipped.
  """
  g = np.asarray(norms, np.float64)
  runs, steps = g.shape
  threshold = np.full((runs, steps), np.inf)
  clipped = np.zeros((runs, steps), bool)
  scale = np.ones((runs, steps))
  cap = np.inf if max_grad_norm is None else float(max_grad_norm)
  mean = var = np.zeros(runs)
  for t in range(steps):
    n = g[:, t]
    if t < warmup_steps:  # Collect; the last warm-up norm starts the EMAs.
      if t == warmup_steps - 1:
        buf = g[:, :warmup_steps]
        mean = buf.mean(axis=1)
        var = np.mean((buf - mean[:, None]) ** 2, axis=1)
      bound = eff = np.full(runs, cap)
    else:
      std = np.sqrt(var)
      if mode == "percentile":
        bound = mean + z_thresh * std
        spike = n > bound
        clip_val = bound
      else:
        bound = mean + z_thresh * (std + eps)
        z = (n - mean) / (std + eps)
        spike = z > z_thresh
        if clip_option == "adaptive_scaling":
          eta = np.where(spike, z / z_thresh, 1.0)
          clip_val = (mean + z_thresh * std / eta) * clip_factor
        else:
          clip_val = mean
      eff = np.minimum(np.where(spike, clip_val, n), cap)
      # The EMAs see the clip value on a spike, the norm otherwise.
      v = np.where(spike, clip_val, n)
      mean = alpha * mean + (1 - alpha) * v
      var = alpha * var + (1 - alpha) * (v - mean) ** 2
    hit = n > eff
    threshold[:, t] = np.where(hit, eff, np.minimum(bound, cap))
    clipped[:, t] = hit
    scale[:, t] = np.where(hit, eff / (n + 1e-6), 1.0)
  return _out(threshold, clipped, scale)


def adagc(norms: np.ndarray, *, clip_ratio: float = 1.04, beta: float = 0.99,
          eps: float = 1e-6, start_clip_steps: int = 100,
          max_norm: float = 1.0) -> dict[str, np.ndarray]:
  """The AdaGC class of the authors' Megatron patch, one tensor."""
  g = np.asarray(norms, np.float64)
  runs, steps = g.shape
  threshold = np.empty((runs, steps))
  clipped = np.zeros((runs, steps), bool)
  scale = np.ones((runs, steps))
  ref = np.full(runs, np.nan)  # state["norm_value"], set on first use.
  for t in range(steps):
    n = g[:, t]
    if t + 1 <= start_clip_steps:  # Its step counter starts at 1.
      coef = max_norm / (n + eps)
      hit = coef < 1.0
      kept = np.where(hit, n * coef, n)
      ref = np.where(np.isnan(ref), kept, np.minimum(ref, kept))
      threshold[:, t] = max_norm
    else:
      ref = np.where(np.isnan(ref), n, ref)
      bound = clip_ratio * ref
      hit = n > bound
      coef = bound / (n + eps)
      kept = np.where(hit, bound, n)
      ref = ref * beta + kept * (1.0 - beta)
      threshold[:, t] = bound
    clipped[:, t] = hit
    scale[:, t] = np.where(hit, coef, 1.0)
  return _out(threshold, clipped, scale)


def autoclip(norms: np.ndarray, *, clip_percentile: float = 90.0
             ) -> dict[str, np.ndarray]:
  """AutoClip's paper code: the percentile of every norm so far, the
  current one included."""
  g = np.asarray(norms, np.float64)
  runs, steps = g.shape
  threshold = np.empty((runs, steps))
  for t in range(steps):
    threshold[:, t] = np.percentile(g[:, :t + 1], clip_percentile, axis=1)
  return _clip_to(g, threshold)


def autoclip_package(norms: np.ndarray, *, quantile: float = 0.9,
                     history_length: int = 1000) -> dict[str, np.ndarray]:
  """The autoclip package's ``QuantileClip(global_threshold=True)``."""
  g = np.asarray(norms, np.float64)
  runs, steps = g.shape
  threshold = np.full((runs, steps), np.inf)
  for t in range(1, steps):
    past = g[:, max(0, t - history_length):t]
    threshold[:, t] = np.quantile(past, quantile, axis=1)
  return _clip_to(g, threshold)


def _clip_to(g: np.ndarray, threshold: np.ndarray) -> dict[str, np.ndarray]:
  """``torch.nn.utils.clip_grad_norm_``: scale by ``t / (n + 1e-6)`` when
  that is below 1."""
  coef = threshold / (g + 1e-6)
  hit = coef < 1.0
  return _out(threshold, hit, np.where(hit, coef, 1.0))


def levanter_clip(norms: np.ndarray, *, rolling_interval_length: int = 128,
                  sigma_factor: float = 3.0) -> dict[str, np.ndarray]:
  """levanter's ``clip_update_by_historical_norm`` on ``norms``."""
  g = np.asarray(norms, np.float64)
  runs, steps = g.shape
  threshold = np.full((runs, steps), np.inf)
  least = max(2, rolling_interval_length // 2)
  for t in range(least, steps):
    past = g[:, max(0, t - rolling_interval_length):t]
    threshold[:, t] = past.mean(axis=1) + sigma_factor * np.maximum(
        past.std(axis=1), 1e-6)
  hit = g > threshold
  return _out(threshold, hit,
              np.where(hit, threshold / np.maximum(g, 1e-6), 1.0))


def levanter_skip(norms: np.ndarray, *, rolling_interval_length: int = 128,
                  sigma_factor: float = 6.0) -> dict[str, np.ndarray]:
  """levanter's ``SkipStepConfig``, judging the gradient norm alone."""
  g = np.asarray(norms, np.float64)
  runs, steps = g.shape
  size = rolling_interval_length + 1
  threshold = np.full((runs, steps), np.inf)
  least = max(2, rolling_interval_length // 2)
  for t in range(least, steps):
    past = g[:, max(0, t - size):t]
    threshold[:, t] = past.mean(axis=1) + sigma_factor * np.maximum(
        past.std(axis=1), 1e-6)
  hit = g > threshold
  return _out(threshold, hit, np.where(hit, 0.0, 1.0))


REFERENCES = {
    "ZClip (reference code)": zclip,
    "AdaGC (official code)": adagc,
    "AutoClip (paper code, 90th percentile)": autoclip,
    "AutoClip (package QuantileClip)": autoclip_package,
    "levanter clip_update_by_historical_norm": levanter_clip,
    "levanter SkipStep (norm)": levanter_skip,
}
"""Label -> rule, each at its source's defaults (ZClip without its fixed
``max_grad_norm`` cap; AutoClip's paper code at the 90th percentile,
optaxclip's and the package's default quantile)."""

"""Float64 NumPy references for per-example clipping and DP-SGD.

Plain loops over examples, computed from the published definitions; they
share no code with optaxclip.
"""

from __future__ import annotations

import math

import numpy as np


def example_norm(leaves: list[np.ndarray], i: int) -> float:
  """The 2-norm of example ``i`` over all leaves, in float64."""
  return math.sqrt(sum(float(np.sum(np.asarray(x[i], np.float64) ** 2))
                       for x in leaves))


def per_example_clip(leaves, max_norm, *, layer_thresholds=None, layers=None,
                     normalize=False, mask=None, nan_safe=True,
                     automatic=None):
  """Sum over examples of the clipped gradients (Abadi et al. 2016).

  Returns ``(sums, norms, num_clipped, num_nonfinite)``; ``sums`` is a list of
  float64 arrays, one per leaf. ``layer_thresholds``, when given, clips each
  layer of each example to its own threshold (McMahan et al. 2018); a layer
  is one leaf, or with ``layers`` (each leaf's layer index) the leaves that
  share an index, clipped by their joint norm. With ``automatic=gamma``
  each example (layer) is weighted ``C / (norm + gamma)`` instead, as
  written in Bu et al. 2022 (AUTO-S), with no special case for norm 0.
  """
  leaves = [np.asarray(x, np.float64) for x in leaves]
  batch = leaves[0].shape[0]
  mask = np.ones(batch, bool) if mask is None else np.asarray(mask)
  sums = [np.zeros(x.shape[1:]) for x in leaves]
  norms, num_clipped, num_nonfinite = [], 0, 0
  if layer_thresholds is None:
    sensitivity = max_norm
  else:
    sensitivity = math.sqrt(sum(t * t for t in layer_thresholds))
  for i in range(batch):
    with np.errstate(all="ignore"):
      n = example_norm(leaves, i)
    norms.append(n)
    if not mask[i]:
      continue
    if not math.isfinite(n):
      num_nonfinite += 1
      if nan_safe:
        continue
    if layer_thresholds is None:
      if automatic is not None:
        scales = [max_norm / (n + automatic)] * len(leaves)
      else:
        scales = [min(1.0, max_norm / n) if n > 0 else 1.0] * len(leaves)
      clipped = n > max_norm
    else:
      layer = list(range(len(leaves))) if layers is None else layers
      layer_scales, clipped = [], False
      for k, t in enumerate(layer_thresholds):
        ln = math.sqrt(sum(float(np.sum(x[i] ** 2))
                           for x, j in zip(leaves, layer) if j == k))
        if automatic is not None:
          layer_scales.append(t / (ln + automatic))
        else:
          layer_scales.append(min(1.0, t / ln) if ln > 0 else 1.0)
        clipped |= ln > t
      scales = [layer_scales[j] for j in layer]
    num_clipped += int(clipped and math.isfinite(n))
    for s, x, k in zip(sums, leaves, scales):
      s += x[i] * k / (sensitivity if normalize else 1.0)
  return sums, np.array(norms), num_clipped, num_nonfinite


def quantile_norm_steps(norm_batches, initial, target_quantile,
                        learning_rate):
  """Andrew et al. (2021)'s geometric update, without noise on the count.

  For each batch of norms returns the threshold in force; the next one is
  ``C * exp(-lr * (fraction with norm <= C - target))``.
  """
  c = float(initial)
  out = []
  for norms in norm_batches:
    out.append(c)
    frac = float(np.mean(np.asarray(norms) <= c))
    c = c * math.exp(-learning_rate * (frac - target_quantile))
  return out

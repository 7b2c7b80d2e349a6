"""Helpers shared by the examples: import path, output folder, tables, plots."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_DIR = Path(os.environ.get("OPTAXCLIP_EXAMPLES_OUTPUT",
                                 Path(__file__).resolve().parent / "output"))

try:  # Run from a checkout without installing: import the package beside us.
  import optaxclip  # noqa: F401
except ImportError:
  sys.path.insert(0, str(ROOT))
import matplotlib  # noqa: E402

import optaxclip as oc  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["OUTPUT_DIR", "all_stats", "fmt", "own_stats", "plt", "print_table", "save"]


def own_stats(opt_state: Any) -> dict[str, Any]:
  """The fields of the one optaxclip transform in ``opt_state``, unprefixed.

  ``{}`` for an optimizer without one (the unclipped baseline of a
  comparison). ``oc.clip_stats`` keys each field ``"<transform>/<field>"``;
  the comparisons here run one clipper at a time and read its fields by name.
  """
  return {k.split("/", 1)[1]: v for k, v in all_stats(opt_state).items()}


def all_stats(opt_state: Any) -> dict[str, Any]:
  """``oc.clip_stats(opt_state)``, or ``{}`` for an optimizer with no clipper."""
  try:
    return oc.clip_stats(opt_state)
  except ValueError:
    return {}


def fmt(x: float) -> str:
  """A number for a table: ``nan``/``inf`` spelled out, else 4 significant digits."""
  x = float(x)
  if math.isnan(x):
    return "nan"
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  return f"{x:.4g}"


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  """Prints a Markdown table; the first column holds stable row labels."""
  cells = [list(map(str, header))] + [
      [c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

  def line(r):
    return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

  print(line(cells[0]))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for row in cells[1:]:
    print(line(row))


def save(fig: Any, name: str) -> Path:
  """Saves ``fig`` as ``<name>.png`` in ``OUTPUT_DIR`` and says where.

  ``OUTPUT_DIR`` is ``examples/output/`` unless ``$OPTAXCLIP_EXAMPLES_OUTPUT``
  names another folder.
  """
  OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
  path = OUTPUT_DIR / f"{name}.png"
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  print(f"saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
  return path

"""Smoke test: examples/loss_spikes.py --small runs and makes its point."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rows(output: str) -> dict[str, list[str]]:
  """The printed Markdown table, as ``{run: [cells...]}``."""
  rows = {}
  for line in output.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("| ") and len(cells) == 7 and cells[0] != "run":
      rows[cells[0]] = cells[1:]
  return rows


def test_loss_spikes_small():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]))
  start = time.time()
  proc = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "loss_spikes.py"), "--small"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = proc.stdout
  spikes = re.search(r"spikes at steps \[([\d, ]+)\]", out)
  assert spikes, out
  num_spikes = len(spikes.group(1).split(","))
  rows = _rows(out)
  assert list(rows) == ["no clipping", "clip_by_global_norm(1.0)",
                        "clip_by_quantile(0.9)", "zclip()",
                        "skip_step(zclip())"], out
  final = {run: float(cells[0]) for run, cells in rows.items()}
  clipped = {run: int(cells[2]) for run, cells in rows.items()}
  skipped = {run: int(cells[3]) for run, cells in rows.items()}
  caught = {run: cells[4] for run, cells in rows.items()}

  # Unclipped, the spikes wreck the run; every guarded run ends far lower.
  for run in ("clip_by_quantile(0.9)", "zclip()", "skip_step(zclip())"):
    assert final[run] < 0.5 * final["no clipping"], out
    assert caught[run] == f"{num_spikes}/{num_spikes}", out
  # The guard skips exactly the spikes; the lone clippers skip nothing.
  assert skipped["skip_step(zclip())"] == num_spikes, out
  assert skipped["zclip()"] == 0 and clipped["no clipping"] == 0, out
  assert clipped["zclip()"] >= num_spikes, out
  png = (ROOT / "examples" / "output" / "loss_spikes.png").stat()
  assert png.st_size > 10_000 and png.st_mtime >= start - 1

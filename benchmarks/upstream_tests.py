"""``python -m benchmarks.upstream_tests``: optax's and jax-privacy's tests, run on optaxclip.

Optax ships its tests: the harness copies ``optax/transforms/_clipping_test.py``
and ``_conditionality_test.py`` (``apply_if_finite``) into a temporary folder
twice, once as shipped and once with the module they test replaced by
:mod:`benchmarks._upstream_shims`, whose functions call the matching optaxclip
transform (``clip`` -> ``clip_by_value``, ``clip_by_block_rms(c)`` ->
``clip_by_norm(c, ord="rms")``, ``clip_by_global_norm``,
``adaptive_grad_clip``, ``per_example_*_clip`` -> ``per_example_clip``,
``apply_if_finite`` -> ``skip_step``), and runs pytest on both in a
subprocess. jax-privacy installs without its tests; their cases of
``clip_pytree`` and ``clipped_grad`` are transcribed in
:mod:`benchmarks._upstream_jax_privacy` and run against jax-privacy and
optaxclip alike. The shims adapt calling conventions only, never results.

Prints a Markdown table (upstream test, result with the upstream library,
result with optaxclip, and why each optaxclip case failed or was skipped)
and writes it to ``benchmarks/results/upstream-tests.md``. Takes a few
minutes on two CPU cores. Nothing is fetched; optax's test files are read
from the installed package.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from typing import Any, NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
COMMAND = "python -m benchmarks.upstream_tests"


class Suite(NamedTuple):
  """One upstream test file and how optaxclip is put in its library's place."""

  label: str
  source: str            # Path inside the optax package.
  original: str          # The import line of the module under test ...
  replacement: str       # ... and the line that imports the shims instead.
  select: tuple[str, ...]  # pytest arguments choosing the mapped tests.
  not_mapped: tuple[tuple[str, str], ...]  # (test, why it is not run).


OPTAX_SUITES = (
    Suite(
        label="clipping",
        source="transforms/_clipping_test.py",
        original="from optax.transforms import _clipping\n",
        replacement=("from benchmarks._upstream_shims import optax_clipping"
                     " as _clipping\n"),
        select=("-k", "ClippingTest and not test_unitwise_norm_with_axis"),
        not_mapped=(("ClippingTest::test_unitwise_norm_with_axis",
                     "tests optax's helper `unitwise_norm`, not a transform"),),
    ),
    Suite(
        label="conditionality",
        source="transforms/_conditionality_test.py",
        original="from optax.transforms import _conditionality\n",
        replacement=("from benchmarks._upstream_shims import"
                     " optax_conditionality as _conditionality\n"),
        select=("-k", "ConditionalityTest and not Conditionally"),
        not_mapped=(("ConditionallyTransformTest, ConditionallyMaskTest",
                     "`conditionally_transform` and `conditionally_mask` have"
                     " no optaxclip counterpart"),),
    ),
)

JAX_PRIVACY_NOT_MAPPED = (
    ("clipping_test.py ClipTransformTest (4 tests)",
     "`clipped_fun` clips a function's outputs; optaxclip clips gradients"
     " only"),
)


def main(argv: list[str] | None = None) -> str:
  args = _parse(sys.argv[1:] if argv is None else argv)
  work = tempfile.mkdtemp(prefix="optaxclip-upstream-")
  try:
    sections = []
    for suite in OPTAX_SUITES:
      if args.only in (None, "optax"):
        sections.append(_optax_section(suite, work))
    if args.only in (None, "jax_privacy"):
      sections.append(_jax_privacy_section(work))
  finally:
    shutil.rmtree(work, ignore_errors=True)
  text = _report(sections, args)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)
  return text


def _parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog=COMMAND,
      description="Run optax's and jax-privacy's clipping tests against"
      " optaxclip and tabulate the differences.")
  p.add_argument("--only", choices=("optax", "jax_privacy"),
                 help="run one library's tests only")
  p.add_argument("--out", default=os.path.join(RESULTS, "upstream-tests.md"),
                 help="Markdown file to write ('' for none)")
  p.add_argument("--no-float64-check", action="store_true",
                 help="skip the float64 measurement of clipped norms")
  return p.parse_args(argv)


# --------------------------------------------------------------------------
# Running pytest.


class Case(NamedTuple):
  test: str      # Upstream test name (class::method), without parameters.
  params: str    # The parameter id, '' if none.
  backend: str   # 'upstream' or 'optaxclip'.
  outcome: str   # passed, failed, error, skipped.
  reason: str


def _optax_section(suite: Suite, work: str) -> dict[str, Any]:
  import optax
  src = os.path.join(os.path.dirname(optax.__file__), suite.source)
  with open(src) as f:
    text = f.read()
  if text.count(suite.original) != 1:
    raise SystemExit(f"{src}: expected the line {suite.original.strip()!r}"
                     " once; the upstream test changed, update the harness.")
  folder = os.path.join(work, suite.label)
  os.makedirs(folder)
  files = {"upstream": f"test_upstream_{suite.label}.py",
           "optaxclip": f"test_optaxclip_{suite.label}.py"}
  _write(os.path.join(folder, files["upstream"]), text)
  _write(os.path.join(folder, files["optaxclip"]),
         text.replace(suite.original, suite.replacement))
  cases = []
  for tc in _pytest(folder, list(files.values()) + list(suite.select)):
    backend = "optaxclip" if tc["file"] == files["optaxclip"] else "upstream"
    cases.append(Case(tc["test"], tc["params"], backend, tc["outcome"],
                      tc["reason"]))
  return dict(title=f"optax {optax.__version__}: optax/{suite.source}",
              upstream="optax", cases=cases, not_mapped=suite.not_mapped)


def _jax_privacy_section(work: str) -> dict[str, Any]:
  import jax_privacy
  folder = os.path.join(work, "jax_privacy")
  os.makedirs(folder)
  name = "test_jax_privacy_clipping.py"
  shutil.copy(os.path.join(HERE, "_upstream_jax_privacy.py"),
              os.path.join(folder, name))
  cases = []
  for tc in _pytest(folder, [name]):
    backend, _, params = tc["params"].partition("-")
    cases.append(Case(tc["test"], params,
                      "optaxclip" if backend == "optaxclip" else "upstream",
                      tc["outcome"], tc["reason"]))
  return dict(title=f"jax-privacy {jax_privacy.__version__}: tests/clipping_test.py"
              " and tests/gradient_clipping_test.py (transcribed)",
              upstream="jax-privacy", cases=cases,
              not_mapped=JAX_PRIVACY_NOT_MAPPED)


def _write(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def _pytest(folder: str, args: list[str]) -> list[dict[str, str]]:
  """Runs pytest in ``folder`` (its own config) and reads the JUnit report."""
  _write(os.path.join(folder, "pytest.ini"),
         "[pytest]\naddopts = -p no:cacheprovider -p no:xdist\n")
  xml = os.path.join(folder, "report.xml")
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-W", "ignore::DeprecationWarning",
       f"--junitxml={xml}", *args],
      cwd=folder, env=env, capture_output=True, text=True, check=False)
  if not os.path.exists(xml):
    raise SystemExit(f"pytest wrote no report (exit {proc.returncode}):\n"
                     f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return [_testcase(tc) for tc in ET.parse(xml).getroot().iter("testcase")]


def _testcase(tc: ET.Element) -> dict[str, str]:
  module, _, cls = tc.get("classname", "").partition(".")
  name = tc.get("name", "")
  base, _, params = name.partition("[")
  outcome, reason = "passed", ""
  for child in tc:
    if child.tag in ("failure", "error", "skipped"):
      outcome = {"failure": "failed"}.get(child.tag, child.tag)
      reason = child.get("message", "") or (child.text or "")
      break
  return dict(file=module + ".py", test=f"{cls}::{base}" if cls else base,
              params=params.rstrip("]"), outcome=outcome,
              reason=_one_line(reason))


def _one_line(message: str, limit: int = 240) -> str:
  # pytest's explanation of an assert ("+ where ...") names objects by address.
  message = message.split("\n +")[0]
  text = " ".join(message.split()).replace("|", "\\|")
  return text if len(text) <= limit else text[:limit - 1] + "…"


# --------------------------------------------------------------------------
# The report.


def _report(sections: list[dict[str, Any]], args: argparse.Namespace) -> str:
  lines = [
      "# Upstream tests against optaxclip", "",
      f"Command: `{COMMAND}`. {_versions()}.", "",
      "Each upstream test runs against its own library (a check of the",
      "harness and of the transcription) and against optaxclip through",
      "`benchmarks/_upstream_shims.py`, which adapts calling conventions only.",
      "A case is skipped where an option has no optaxclip counterpart. The",
      "differences are explained in docs/migration.md, section \"Differences",
      "from optax and jax-privacy, found by their own tests\".", ""]
  for s in sections:
    lines += _section(s)
  if not args.no_float64_check and args.only in (None, "jax_privacy"):
    lines += _float64_check()
  return "\n".join(lines).rstrip() + "\n"


def _versions() -> str:
  import jax
  import optax

  import optaxclip
  parts = [f"Python {sys.version.split()[0]}", f"jax {jax.__version__}",
           f"optax {optax.__version__}"]
  try:
    import jax_privacy
    parts.append(f"jax-privacy {jax_privacy.__version__}")
  except ImportError:
    pass
  parts.append(f"optaxclip {optaxclip.__version__}")
  day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
  return ", ".join(parts) + f"; run {day}"


def _section(s: dict[str, Any]) -> list[str]:
  by_test: dict[str, dict[str, list[Case]]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  for c in s["cases"]:
    by_test[c.test][c.backend].append(c)
  lines = [f"## {s['title']}", "",
           f"| upstream test | {s['upstream']} | optaxclip | why failed or"
           " skipped |", "|---|---|---|---|"]
  totals: collections.Counter[str] = collections.Counter()
  for test, runs in by_test.items():
    mine, theirs = runs.get("optaxclip", []), runs.get("upstream", [])
    totals.update(c.outcome for c in mine)
    why = [x for x in (_reasons(theirs, s["upstream"]),
                       _reasons(mine, "optaxclip")) if x]
    lines.append(f"| `{test}` | {_tally(theirs)} | {_tally(mine)} |"
                 f" {'<br>'.join(why)} |")
  for test, why in s["not_mapped"]:
    lines.append(f"| `{test}` | not run | not run | {why} |")
  summary = ", ".join(f"{n} {k}" for k, n in sorted(totals.items()))
  lines += ["", f"optaxclip cases: {summary}.", ""]
  return lines


def _tally(cases: list[Case]) -> str:
  if not cases:
    return "—"
  if len(cases) == 1:
    return cases[0].outcome
  counts = collections.Counter(c.outcome for c in cases)
  order = ("passed", "failed", "error", "skipped")
  return ", ".join(f"{counts[k]} {k}" for k in order if counts[k])


def _reasons(cases: list[Case], library: str, shown: int = 3) -> str:
  """Failures and skips grouped by their message (numbers masked)."""
  groups: dict[tuple[str, str], list[Case]] = {}
  for c in cases:
    if c.outcome != "passed":
      key = (c.outcome, re.sub(r"\d[\w.+-]*", "#", c.reason))
      groups.setdefault(key, []).append(c)
  out = []
  for (outcome, _), members in groups.items():
    ids = [m.params for m in members if m.params]
    where = ""
    if ids:
      listed = ", ".join(f"`{i}`" for i in ids[:shown])
      more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
      noun = "case" if len(members) == 1 else "cases"
      where = f" ({len(members)} {noun}: {listed}{more})"
    out.append(f"{library} **{outcome}**{where}: {members[0].reason}")
  return "<br>".join(out)


def _float64_check() -> list[str]:
  """The clipped norm of the mixed-precision case, measured in float64.

  ``test_clip_pytree_has_bounded_norm`` measures the clipped tree with
  ``optax.tree.norm``, which sums float16 squares in float16; measured
  exactly, both libraries' outputs exceed the clipping norm by the rounding
  of their low-precision leaves.
  """
  import jax
  import numpy as np
  import optax
  from jax_privacy import clipping

  from benchmarks import _upstream_jax_privacy as cases
  from benchmarks import _upstream_shims

  def exact(tree: Any) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                             for x in jax.tree.leaves(tree))))

  tree = optax.tree.random_like(jax.random.key(0),
                                cases.STRUCTS["mixed_f16_f32_bf16"])
  lines = ["## Clipped norms of the mixed-precision tree, measured in float64",
           "",
           "`test_clip_pytree_has_bounded_norm` on the float16/float32/bfloat16",
           "tree: the norm of the clipped tree as the test measures it",
           "(`optax.tree.norm`, in each leaf's dtype) and exactly (float64).", "",
           "| clip_norm | library | optax.tree.norm | float64 |", "|---|---|---|---|"]
  for c in (1.0, 2.0):
    for name, fn in (("jax-privacy", clipping.clip_pytree),
                     ("optaxclip", _upstream_shims.clip_pytree)):
      out, _ = fn(tree, c)
      lines.append(f"| {c} | {name} | {float(optax.tree.norm(out)):.7f} |"
                   f" {exact(out):.7f} |")
  return lines + [""]


if __name__ == "__main__":
  main()

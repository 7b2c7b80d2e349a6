"""The README's Python blocks run, in order, and print what they say they do."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_two_commands_first():
  first = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
  lines = first.strip().splitlines()
  assert len(lines) == 2
  assert "examples/exploding_gradients.py" in lines[0]
  assert "pytest" in lines[1]


def test_readme_python_blocks_run_and_print_what_they_show():
  blocks = python_blocks()
  assert len(blocks) >= 3
  namespace: dict = {}
  for block in blocks:
    # The "# " comment lines that end a block are the output it shows.
    lines = block.rstrip().splitlines()
    expected = []
    while lines and lines[-1].startswith("# "):
      expected.insert(0, lines.pop()[2:])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    if expected:
      assert out.getvalue().splitlines() == expected

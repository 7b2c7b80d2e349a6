"""The README's Python blocks run, in order, and print what they say they do."""

import pathlib
import re

import pytest

from tests._blocks import run_blocks

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_two_commands_first():
  first = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
  lines = first.strip().splitlines()
  assert len(lines) == 2
  assert "examples/exploding_gradients.py" in lines[0]
  assert "pytest" in lines[1]


@pytest.mark.slow
def test_readme_python_blocks_run_and_print_what_they_show():
  blocks = python_blocks()
  assert len(blocks) >= 3
  run_blocks(blocks, str(README))

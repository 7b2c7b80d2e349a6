"""Runs Markdown ``python`` blocks in order and checks what they print."""

import contextlib
import io


def run_blocks(blocks: list[str], filename: str) -> None:
  """Runs ``blocks`` in one namespace; each may end with its expected output.

  The ``# `` comment lines that end a block are the output it shows; when
  there are any, the block must print exactly those lines.
  """
  namespace: dict = {}
  for block in blocks:
    lines = block.rstrip().splitlines()
    expected = []
    while lines and lines[-1].startswith("# "):
      expected.insert(0, lines.pop()[2:])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(block, filename, "exec"), namespace)  # noqa: S102
    if expected:
      assert out.getvalue().splitlines() == expected, filename

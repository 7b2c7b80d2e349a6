"""The documentation's Python blocks run and print what they say they do.

Each page under ``docs/`` runs in its own namespace, its ``python`` blocks in
order; the ``# `` comment lines that end a block are the output it shows. Code
that is for reading only (PyTorch, Keras) sits in ``{code-block}`` directives,
which this test leaves alone. The API page is generated from
``optaxclip.__all__`` when the docs are built; the last test checks that every
public name gets an entry.
"""

import importlib.util
import pathlib
import re

import pytest

import optaxclip
from tests._blocks import run_blocks

pytestmark = pytest.mark.slow

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md"))


def python_blocks(page):
  return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_python_blocks_run_and_print_what_they_show(page):
  run_blocks(python_blocks(page), str(page))


def test_api_page_lists_every_public_name():
  pytest.importorskip("sphinx")
  spec = importlib.util.spec_from_file_location("docs_conf", DOCS / "conf.py")
  conf = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(conf)
  text = conf.api_reference()
  for name in optaxclip.__all__:
    assert re.search(rf"^\.\. \w+:: {name}$", text, re.M), name

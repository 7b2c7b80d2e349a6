"""The typed user script that mypy checks also runs."""

import importlib.util
import pathlib

import pytest

pytestmark = pytest.mark.slow

SCRIPT = pathlib.Path(__file__).parent / "typing" / "user_script.py"


def test_user_script_runs():
  spec = importlib.util.spec_from_file_location("user_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main()

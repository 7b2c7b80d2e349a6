"""Two JAX processes on localhost train one sharded model: same result as one device.

The workers are ``examples/multihost.py`` processes (``jax.distributed`` with
CPU collectives, two CPU devices each, the model sharded FSDP-style over all
four devices); the single-device reference runs here, in the test process.
"""

import importlib.util
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow

_PATH = Path(__file__).resolve().parents[1] / "examples" / "multihost.py"
_spec = importlib.util.spec_from_file_location("multihost_example", _PATH)
multihost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(multihost)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("multihost")
  results = multihost.launch(out, steps=multihost.STEPS, timeout=100.0)
  reference = multihost.run_all(jax.devices()[:1], multihost.STEPS)
  return results, reference


def test_both_processes_hold_identical_results(runs):
  results, _ = runs
  assert len(results) == multihost.NUM_PROCESSES
  first, second = results
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_processes_match_a_single_device_run(runs):
  results, reference = runs
  assert results[0].keys() == reference.keys()
  for key, value in results[0].items():
    if value.dtype == bool or np.issubdtype(value.dtype, np.integer):
      np.testing.assert_array_equal(value, reference[key], err_msg=key)
    else:
      np.testing.assert_allclose(value, reference[key], rtol=1e-4, atol=1e-5,
                                 err_msg=key)


def test_every_optimizer_trained_and_clipped(runs):
  results, _ = runs
  names = list(multihost.optimizers())
  assert names == ["clip_by_global_norm", "zclip"]
  for name in names:
    stats = {k.split("/")[-1]: v for k, v in results[0].items()
             if k.startswith(f"{name}/stats/")}
    assert stats["loss"].shape == (multihost.STEPS,)
    assert stats["count"][-1] == multihost.STEPS
    assert 0 < stats["num_clipped"][-1] <= multihost.STEPS
    assert np.all(np.isfinite(stats["norm"]))
    assert stats["loss"][-1] < stats["loss"][0]
    # The recorded pre-clip norm is the norm of the whole model's gradient:
    # above the threshold whenever the step was clipped.
    clipped = stats["clipped"]
    assert np.all(stats["norm"][clipped] > stats["threshold"][clipped])


def test_a_failing_worker_is_reported_and_cleaned_up(tmp_path, monkeypatch):
  # A worker that cannot reach its peer within the timeout: launch must kill
  # both and raise with their output.
  started = []
  popen = subprocess.Popen

  def spy(*args, **kwargs):
    proc = popen(*args, **kwargs)
    started.append(proc)
    return proc

  monkeypatch.setattr(multihost.subprocess, "Popen", spy)
  monkeypatch.setattr(multihost, "NUM_PROCESSES", 1)
  with pytest.raises(RuntimeError, match="worker"):
    multihost.launch(tmp_path, steps=1, timeout=0.5)
  assert started and all(p.poll() is not None for p in started)

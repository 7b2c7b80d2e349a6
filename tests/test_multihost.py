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

import optaxclip as oc

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


# ----------------------------------------------------------------------------
# Two pipeline stages as two programs: examples/pipeline_two_programs.py.

_PIPE = Path(__file__).resolve().parents[1] / "examples" / (
    "pipeline_two_programs.py")
_pipe_spec = importlib.util.spec_from_file_location("pipeline_example", _PIPE)
pipeline = importlib.util.module_from_spec(_pipe_spec)
_pipe_spec.loader.exec_module(pipeline)


def test_two_pipeline_programs_match_one_program_bit_for_bit(tmp_path):
  stages = pipeline.launch(tmp_path, steps=pipeline.STEPS, timeout=120.0)
  reference = pipeline.run_one_program(pipeline.STEPS)
  # Every update of both stages equal to the one program's, bit for bit;
  # the norm and the skip decision too.
  assert pipeline.compare(stages, reference) == 10 * pipeline.STEPS
  skipped = [r["skipped"] for r in reference]
  assert skipped == [t == pipeline.SPIKE_STEP for t in range(pipeline.STEPS)]
  # The steps that were taken were clipped (norm above 1), by the norm of
  # the whole model with the tied embedding counted once.
  for t, r in enumerate(reference):
    g = pipeline.gradients(t)
    want = np.sqrt(sum(np.sum(np.square(v.astype(np.float64)))
                       for v in jax.tree.leaves(g)))
    np.testing.assert_allclose(float(r["norm"]), want, rtol=1e-6)
  # Counting the tied weight in both stages reads high: the mask matters.
  g = pipeline.gradients(0)
  twice = (oc.norm_parts(pipeline.stage_tree(g, 0))
           + oc.norm_parts(pipeline.stage_tree(g, 1)))
  assert float(twice.norm()) > float(reference[0]["norm"]) * 1.01

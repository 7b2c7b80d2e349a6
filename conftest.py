"""Test setup: the host CPU device count, set before JAX starts its backend.

The suite runs on 8 host devices by default, so that sharded paths are
exercised; ``OPTAXCLIP_TEST_DEVICES=1`` runs it as most users run, on one
(``tests/test_devices.py`` does that for the core tests, in a subprocess).
"""

import os
import re

_count = os.environ.get("OPTAXCLIP_TEST_DEVICES", "8")
_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = (
    _flags + f" --xla_force_host_platform_device_count={_count}").strip()


def pytest_collection_modifyitems(config, items):
  """Two examples need a newer Flax than the oldest supported: layer_axes'
  spells the sharding key as Flax 0.12.4 and later do ("out_sharding"; older
  Flax's "sharding_names" is read too), and gather_max_logits' uses
  nnx.capture (without it, the model's own nnx.Intermediate state is read)."""
  try:
    import flax
    from flax import nnx
  except ImportError:
    return
  import pytest
  version = tuple(int(re.match(r"\d*", p).group() or 0)
                  for p in flax.__version__.split(".")[:3])
  skip = pytest.mark.skip(reason="Flax < 0.12.4 spells out_sharding as"
                          " sharding_names")
  for item in items:
    if item.name == "optaxclip._layers.layer_axes" and version < (0, 12, 4):
      item.add_marker(skip)
  if not hasattr(nnx, "capture"):
    no_capture = pytest.mark.skip(reason="this Flax has no nnx.capture")
    for item in items:
      if item.name == "optaxclip._qk_clip.gather_max_logits":
        item.add_marker(no_capture)

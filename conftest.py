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

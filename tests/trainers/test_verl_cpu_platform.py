"""stable-async's CPU platform for veRL: selected by ``VERL_PLATFORM=cpu`` alone, never auto-detected."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import stable_async as sa

pytestmark = [pytest.mark.trainers, pytest.mark.timeout(600)]  # a fresh `import verl` in a subprocess
pytest.importorskip("verl")

from stable_async.integrations import verl_cpu  # noqa: E402

PROBE = """
import json, verl
from verl.plugin.platform import get_platform
from verl.utils.device import get_device_name, get_nccl_backend, get_resource_name, get_torch_device
from verl.workers.engine import EngineRegistry
p = get_platform()
engine = EngineRegistry.get_engine_cls("language_model", "fsdp2")
print(json.dumps({
    "platform": type(p).__module__ + "." + type(p).__name__,
    "device": get_device_name(), "backend": get_nccl_backend(), "ray_resource": get_resource_name(),
    "current_device": p.current_device(), "max_memory_allocated": get_torch_device().max_memory_allocated(),
    "engine": engine.__name__,
}))
"""


def test_verl_platform_cpu_alone_selects_our_platform_and_fsdp_engine():
    src = os.path.dirname(os.path.dirname(os.path.abspath(sa.__file__)))
    env = {**os.environ, "VERL_PLATFORM": "cpu", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["platform"] == "stable_async.integrations.verl_cpu.PlatformCPU"
    assert (out["device"], out["backend"], out["ray_resource"], out["current_device"]) == ("cpu", "gloo", "CPU", "cpu")
    assert out["max_memory_allocated"] > 0
    assert out["engine"] == "FSDPEngineWithLMHead"


def test_cpu_platform_is_never_auto_detected():
    platform = verl_cpu.platform_class()()
    assert platform.is_available()
    assert not platform.is_platform_available(use_smi_check=True)  # veRL's auto-detection skips it

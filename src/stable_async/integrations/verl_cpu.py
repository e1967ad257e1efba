"""A CPU platform for veRL's platform registry (``verl.plugin.platform``): veRL's worker path on a CPU.

veRL 0.9.1 routes every device question (device name, ``torch.<device>`` module, collective
backend, Ray resource, RNG, memory) through a platform object chosen once per process by
``verl.plugin.platform.get_platform()``; it ships ``cuda``, ``npu`` and ``rocm`` only. `register`
adds a ``cpu`` platform to veRL's own ``PlatformRegistry``, selected explicitly with
``VERL_PLATFORM=cpu`` (never auto-detected: on a machine without accelerators veRL keeps its
fallback). With it, a gloo process group and ``attn_implementation=sdpa``, veRL's actor worker
(``verl.workers.engine_workers.ActorRolloutRefWorker``) builds its FSDP engine and trains on a CPU,
which is how stable-async tests its veRL adapter where veRL's users run it. It is a debugging and
CI tool: nothing about speed.

The stable-async plugin registers it on ``import verl`` when ``VERL_PLATFORM=cpu`` is set, so
``VERL_PLATFORM=cpu`` alone is enough in every process that imports veRL.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from typing import Any

import torch

PLATFORM_NAME = "cpu"
PLATFORM_ENV = "VERL_PLATFORM"


class CPUDeviceModule:
    """What veRL asks of ``torch.<device>`` (its ``get_torch_device()``), answered for the CPU.

    Streams, events, ``synchronize`` and device counts come from ``torch.cpu``; the RNG is
    torch's default generator; memory is the process's resident memory (allocated = reserved =
    current RSS, max = peak RSS) and the machine's (``mem_get_info``), read with ``psutil``;
    cache and memory-fraction calls do nothing.
    """

    Stream = torch.cpu.Stream
    Event = torch.cpu.Event
    stream = staticmethod(torch.cpu.stream)
    current_stream = staticmethod(torch.cpu.current_stream)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> str:
        return "cpu"  # as torch.cpu.current_device(); veRL passes it where a device is expected

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def synchronize(device: Any = None) -> None:
        torch.cpu.synchronize()

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    memory_reserved = memory_allocated

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux

    max_memory_reserved = max_memory_allocated

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.available), int(memory.total)


def platform_class() -> type:
    """veRL's ``PlatformBase`` subclass for the CPU (built on first use: veRL is imported here)."""
    from verl.plugin.platform import PlatformBase

    class PlatformCPU(PlatformBase):
        """veRL platform ``cpu``: device ``cpu``, backend ``gloo``, Ray resource ``CPU``."""

        device_name = "cpu"
        vendor_name = "cpu"
        device_module = CPUDeviceModule

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            return False  # only by VERL_PLATFORM=cpu: auto-detection keeps veRL's own fallback

        def current_device(self) -> str:
            return "cpu"  # veRL passes it to .to(device=...): an index would mean an accelerator

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: int | None = None) -> None:
            torch.cpu.synchronize()

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str) -> Iterator[None]:
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            return "CPU"

        def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
            return {"num_cpus": num_gpus}

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    PlatformCPU.__module__ = __name__
    PlatformCPU.__qualname__ = "PlatformCPU"
    return PlatformCPU


FSDP_BACKENDS = ("fsdp", "fsdp2")


def register_engines() -> None:
    """Make veRL's FSDP engines (``fsdp``, ``fsdp2``; LM head and value head) selectable on device ``cpu``.

    veRL's ``EngineRegistry`` keys engines by device and lists ``cuda`` / ``npu`` only for its
    FSDP engines, which run unchanged on a CPU with gloo. Idempotent.
    """
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    for model_type, engine in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        for backend in FSDP_BACKENDS:
            with contextlib.suppress(AssertionError):  # veRL asserts a (device, backend) pair is new: registered
                EngineRegistry.register(model_type=model_type, backend=backend, device=PLATFORM_NAME)(engine)


def register(*, engines: bool = True) -> type:
    """Register the ``cpu`` platform in veRL's ``PlatformRegistry`` (idempotent); returns its class.

    Select it with ``VERL_PLATFORM=cpu`` before veRL first asks for its platform (veRL resolves the
    platform once per process). ``engines``: also `register_engines` (imports veRL's FSDP engine,
    a few seconds).
    """
    from verl.plugin.platform import PlatformRegistry

    cls = PlatformRegistry.get(PLATFORM_NAME)
    if cls is None or cls.__module__ != __name__:
        cls = platform_class()
        PlatformRegistry.register(platform=PLATFORM_NAME)(cls)
    if engines:
        register_engines()
    return cls


def init_process_group() -> None:
    """Open the default process group with gloo from ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``.

    Do this before building a veRL worker on the CPU: veRL's own
    ``initialize_global_process_group_ray`` asks torch for the backend
    ``"cpu:gloo,<device>:<backend>"``, which on device ``cpu`` reads ``"cpu:gloo,cpu:gloo"`` and
    torch rejects ("Duplicate device type cpu"); veRL skips it when a group exists.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1"))
        )


def requested() -> bool:
    """True when ``VERL_PLATFORM=cpu`` selects this platform."""
    return os.environ.get(PLATFORM_ENV, "").strip().lower() == PLATFORM_NAME


def register_if_requested() -> bool:
    """`register` when ``VERL_PLATFORM=cpu`` (what the stable-async plugin runs on ``import verl``)."""
    if not requested():
        return False
    register()
    return True


__all__ = [
    "PLATFORM_ENV",
    "PLATFORM_NAME",
    "CPUDeviceModule",
    "init_process_group",
    "platform_class",
    "register",
    "register_engines",
    "register_if_requested",
    "requested",
]

"""GPU memory, read through NVML (``nvidia-ml-py``, which vLLM's CUDA build installs).

NVML reads a device's memory without creating a CUDA context in this process (``torch.cuda``
would: hundreds of MiB of GPU memory per engine process, and vLLM's model runs in a child
process anyway). Without NVML or a GPU there is nothing to report and no instrument is made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("conduit.engine")

#: (device id, device name, used bytes, total bytes) for each visible GPU.
GpuMemory = list[tuple[str, str, int, int]]


def nvml_reader(nvml: Any = None) -> Callable[[], GpuMemory] | None:
    """A function reading every visible GPU's memory, or None where there is no GPU to read.

    ``nvml``: the ``pynvml`` module (imported when not given).
    """
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return None
    try:
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
    except Exception:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU here
        return None
    if count == 0:
        return None
    devices = []
    for i in range(count):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        name = nvml.nvmlDeviceGetName(handle)
        devices.append((f"gpu{i}", name.decode() if isinstance(name, bytes) else str(name), handle))

    def read() -> GpuMemory:
        out = []
        for device_id, name, handle in devices:
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            out.append((device_id, name, int(info.used), int(info.total)))
        return out

    log.info("reporting memory of %d GPU(s)", count)
    return read

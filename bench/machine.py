"""What a bench ran on: the machine and version records every bench writes into its JSON, so that
figures from different runs (and machines) can be told apart."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from pathlib import Path

import torch

PACKAGES = ("transformers", "tokenizers", "torchrec", "fbgemm_gpu", "fbgemm_gpu_cpu", "pyarrow", "numpy")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides fp32 / bf16 matmul speed on a CPU


def machine(device: torch.device | None = None) -> dict:
    """CPU model, counts and matrix-unit flags, torch threads, platform, load average now; and the GPU's
    name, memory and SM count when ``device`` is CUDA (this initialises CUDA: call it after any work
    that must run before a CUDA context exists)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = cpuinfo.splitlines()
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    info = {"cpu_model": models[0] if models else platform.processor(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_flags": [f for f in CPU_FLAGS if f in flags], "torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "platform": platform.platform(),
            "device": str(device) if device is not None else "cpu", "loadavg_start": os.getloadavg()}
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_mib=props.total_memory / 2**20, gpu_sms=props.multi_processor_count)
    return info


def versions() -> dict:
    """Python, torch (and its CUDA) and the installed versions of the packages the benches exercise."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out

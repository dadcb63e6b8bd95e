"""The machine: what it is (CPU, libraries, threads), how fast it reads memory, and how fast its
kernels run the matrix products of one decode step alone (the floors the decode times are read
against)."""

from __future__ import annotations

import os
import platform

import torch
from torch import nn
from transformers import OPTForCausalLM

from bench.timing import Device, best_seconds
from epalm.model import PackedLinear, can_pack


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            mem_total = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import timm
    import transformers

    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": mem_total,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "onednn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
    return info


def memory_bandwidth(dev: Device, gib: float = 2.0, repeats: int = 3, copy: bool = True) -> dict:
    """Read (and copy) rates over a `gib` GiB buffer. `read_gbps`, the best of a sum over the buffer
    and (CPU) a one-row oneDNN matrix-vector product over it, is what a decode step needs: every
    weight read once. The matrix-vector product has a decode step's access pattern and reads
    faster than the sum on some machines; the best of the two is a lower estimate of the memory's
    bandwidth. Where the rate drifts over minutes, runs take a small sample next to them."""
    n = max(1, int(gib * (1 << 30)) // 4 // 2048) * 2048  # whole rows of 2048 for the product
    nbytes = n * 4
    src = torch.empty(n, dtype=torch.float32, device=dev.device).uniform_()

    out = {"buffer_bytes": nbytes}
    if copy:
        dst = torch.empty_like(src)
        out["copy_gbps"] = 2 * nbytes / best_seconds(dev, lambda: dst.copy_(src), repeats) / 1e9  # read + write
        del dst
    out["sum_gbps"] = nbytes / best_seconds(dev, lambda: src.sum(), repeats) / 1e9
    packed = None
    if can_pack(src):
        linear = nn.Linear(2048, n // 2048, bias=False, device="meta")
        linear.weight = nn.Parameter(src.view(-1, 2048), requires_grad=False)
        packed = PackedLinear.checked(linear)
    if packed is not None:
        v = torch.randn(1, 2048)
        out["gemv_gbps"] = nbytes / best_seconds(dev, lambda: packed(v), repeats) / 1e9
        del packed
    out["read_gbps"] = max(out["sum_gbps"], out.get("gemv_gbps", 0.0))
    return out


def bandwidth_probe(dev: Device, mib: int = 512) -> dict:
    """The quick sample of `memory_bandwidth` taken around each group of runs."""
    return memory_bandwidth(dev, gib=mib / 1024, copy=False)


@torch.inference_mode()
def linear_floor(lm: OPTForCausalLM, dev: Device, rows: int, repeats: int = 3) -> dict:
    """Time of only the matrix products of one decode step (every Linear of the decoder and the
    head, `rows` rows each): the floor this torch build's kernels allow, without attention or
    python. Uses the modules as they are (plain or packed)."""
    linears = [m for m in lm.model.decoder.layers.modules() if hasattr(m, "in_features")]
    linears.append(lm.lm_head)
    dtype = lm.model.decoder.embed_tokens.weight.dtype
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype, device=dev.device) for m in linears}

    def once() -> None:
        for m in linears:
            m(inputs[m.in_features])

    return {"rows": rows, "seconds": best_seconds(dev, once, repeats)}

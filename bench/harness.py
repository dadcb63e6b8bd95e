"""Measurement pieces of the benchmark: random-weight models at the real shapes, timers, peak
memory, the machine's memory bandwidth, and the runs themselves (eP-ALM cached / uncached and
plain transformers `generate`). `run.py` drives them; tests call them on tiny shapes.

Nothing is downloaded: every model is built from its config and filled with random weights.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import torch
from transformers import (
    ASTConfig,
    ASTModel,
    LogitsProcessor,
    LogitsProcessorList,
    OPTConfig,
    OPTForCausalLM,
    TimesformerConfig,
    TimesformerModel,
)

from epalm import decoding
from epalm.decoding import DecodingOptions, generate
from epalm.encoders import Encoder, wrap_encoder
from epalm.model import EPALM, Adapter, InjectionConfig

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# Shapes

_OPT_COMMON = dict(vocab_size=50272, max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=2)
LM_SHAPES: dict[str, dict] = {
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32, word_embed_proj_dim=4096),
    "opt-2.7b": dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32, word_embed_proj_dim=2560),
    "opt-350m": dict(
        hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16, word_embed_proj_dim=512,
        do_layer_norm_before=False,
    ),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, word_embed_proj_dim=768),
    # tests only: a few layers, a small vocabulary
    "tiny": dict(
        hidden_size=64, num_hidden_layers=6, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
        vocab_size=512, max_position_embeddings=128,
    ),
}

# Encoder families: "real" = the paper's encoders; "small" = same architectures, narrower and
# shallower (for --quick); "tiny" = tests.
ENCODER_SHAPES: dict[str, dict[str, dict]] = {
    "real": {
        "image": dict(timm="vit_base_patch16_224"),
        "video": dict(),  # TimesformerConfig() defaults: TimeSformer-B, 224 px, patch 16, 12 layers
        "audio": dict(layer_norm_eps=1e-6),  # ASTConfig defaults: AST-B, 1024 frames x 128 mel
    },
    "small": {
        "image": dict(timm="vit_small_patch16_224"),
        "video": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
        "audio": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536, layer_norm_eps=1e-6),
    },
    "tiny": {
        "image": dict(img_size=224, patch_size=32, embed_dim=32, depth=6, num_heads=2),
        "video": dict(patch_size=32, hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64),
        "audio": dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6),
    },
}

# Inputs: name -> (encoder family, frames). `--modalities video` measures 8 and 16 frames.
INPUTS = {"image": ("image", None), "video8": ("video", 8), "video16": ("video", 16), "audio": ("audio", None)}
MODALITY_INPUTS = {"image": ["image"], "video": ["video8", "video16"], "audio": ["audio"]}

# Decoding settings: 29 new tokens after BOS (max_length 30), forced to full length because no
# id equals eos_token_id=-1 (the loops compare ids with it and never stop early).
NO_EOS = -1
SETTINGS = {
    "paper": dict(num_beams=3),
    "greedy": dict(num_beams=1),
}


def injection_for(num_layers: int, lm_name: str) -> InjectionConfig:
    """The paper's settings (OPT-2.7B: layers 19..30, end 31 of 32, N=6, prompt 10 + MLP), moved
    for shallower LMs so that `end` is again the last-but-one layer; OPT-6.7B uses pt_L's
    (shared connector, no MLP)."""
    end = num_layers - 1
    start = max(0, end - 12)
    if lm_name == "opt-6.7b":
        return InjectionConfig(start, end, 6, shared_connector=True, prompt_len=10, prompt_mlp=False)
    return InjectionConfig(start, end, 6, shared_connector=False, prompt_len=10, prompt_mlp=True)


# --------------------------------------------------------------------------------------------
# Random weights, quickly


class _RandomPool:
    """Fills tensors from one pool of N(0, std) numbers at varying offsets: random-looking weights
    at memory speed (torch's normal_ needs ~50 s for 2.7B weights in bfloat16 on 2 cores)."""

    def __init__(self, size: int = 1 << 24, std: float = 0.02, seed: int = 0, device: torch.device | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(size, generator=g) * std).to(device or "cpu")
        self.offset = 0

    @torch.no_grad()
    def fill(self, tensor: torch.Tensor) -> None:
        flat = tensor.view(-1)
        size = len(self.pool)
        done = 0
        while done < flat.numel():
            start = self.offset % size
            n = min(size - start, flat.numel() - done)
            flat[done : done + n].copy_(self.pool[start : start + n])
            done += n
            self.offset += n + 7919  # a prime stride: consecutive tensors do not line up
        self.offset = (self.offset * 31 + 104729) % size


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Matrices ~ N(0, std), biases 0, LayerNorm weights 1 (a stable random model)."""
    first = next(module.parameters(), None)
    pool = _RandomPool(std=std, seed=seed, device=first.device if first is not None else None)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            pool.fill(param)
        elif "norm" in name and name.endswith("weight"):
            param.fill_(1.0)
        else:
            param.zero_()
    return module


def build_lm(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> OPTForCausalLM:
    """OPT at a real shape with random weights, built on the meta device then filled in place (no
    fp32 copy when bf16 is asked, no slow per-module init)."""
    config = OPTConfig(**{**_OPT_COMMON, **LM_SHAPES[name]}, attn_implementation="eager")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            lm = OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    lm.to_empty(device=device)
    lm.tie_weights()  # to_empty unties lm_head from embed_tokens
    assert lm.lm_head.weight is lm.model.decoder.embed_tokens.weight
    randomize_(lm, seed=seed)
    return lm.eval().requires_grad_(False)


def build_encoder(family: str, modality: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Encoder:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    kwargs = dict(ENCODER_SHAPES[family][modality])
    if modality == "image":
        name = kwargs.pop("timm", None)
        model = timm.create_model(name, pretrained=False, num_classes=0) if name else VisionTransformer(num_classes=0, **kwargs)
    elif modality == "video":
        model = TimesformerModel(TimesformerConfig(**kwargs, attn_implementation="eager"))
    elif modality == "audio":
        model = ASTModel(ASTConfig(**kwargs, attn_implementation="eager"))
    else:
        raise ValueError(modality)
    return wrap_encoder(model.to(device=device, dtype=dtype).eval())


def encoder_input(name: str, batch: int, dtype: torch.dtype, device: torch.device, encoder: Encoder) -> torch.Tensor:
    family, frames = INPUTS[name]
    g = torch.Generator().manual_seed(1)
    if family == "image":
        shape = (batch, 3, 224, 224)
    elif family == "video":
        shape = (batch, frames, 3, 224, 224)
    else:
        config = encoder.model.config
        shape = (batch, config.max_length, config.num_mel_bins)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def build_adapter(injection: InjectionConfig, encoder_dim: int, lm: OPTForCausalLM, dtype, device, seed: int = 0) -> Adapter:
    config = lm.config
    adapter = Adapter(injection, encoder_dim, config.hidden_size, config.word_embed_proj_dim)
    randomize_(adapter, seed=seed + 100, std=0.05)
    return adapter.to(device=device, dtype=dtype).eval().requires_grad_(False)


def param_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


# --------------------------------------------------------------------------------------------
# Clocks and memory


class Device:
    """Timing and peak-memory helpers for cpu or cuda (cuda calls only when the device is cuda)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    @contextlib.contextmanager
    def peak_memory(self) -> Iterator[dict]:
        """Yields a dict filled on exit: `peak_bytes` (CPU: resident-set high-water mark of the
        process, VmHWM, reset before the block through /proc/self/clear_refs; CUDA:
        max_memory_allocated) and `peak_delta_bytes` (over what was held before the block)."""
        out: dict = {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        else:
            base = rss_bytes()
            out["hwm_reset"] = reset_rss_peak()
        yield out
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else rss_peak_bytes()
        out.update(peak_bytes=peak, peak_delta_bytes=peak - base, base_bytes=base)


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    value = _status_kb("VmRSS")
    if value is None:  # not Linux: fall back to the (unresettable) peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return value


def rss_peak_bytes() -> int:
    value = _status_kb("VmHWM")
    if value is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return value


def reset_rss_peak() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class CpuMonitor:
    """CPU time used by *other* processes while a block runs (from /proc/stat minus this process's
    own CPU time), in cores: with 2 cores and OpenMP, another busy process can slow a decode step
    tenfold (threads wait for a descheduled sibling), so such runs are detected and repeated."""

    def __init__(self) -> None:
        self.foreign_cores: float | None = None
        self.steal_cores: float | None = None

    @staticmethod
    def _stat() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]  # user nice system irq softirq
        steal = fields[7] if len(fields) > 7 else 0
        return busy / hz, steal / hz

    def __enter__(self) -> "CpuMonitor":
        self._start = (self._stat(), sum(os.times()[:2]), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        stat0, own0, t0 = self._start
        stat1, own1, t1 = self._stat(), sum(os.times()[:2]), time.perf_counter()
        self._end = t1
        if stat0 is None or stat1 is None or t1 <= t0:
            return
        self.foreign_cores = max(0.0, (stat1[0] - stat0[0]) - (own1 - own0)) / (t1 - t0)
        self.steal_cores = (stat1[1] - stat0[1]) / (t1 - t0)

    def disturbed(self, limit: float = 0.3) -> bool:
        """More than `limit` cores taken by others (blocks under 0.5 s are too short to tell)."""
        stat0, _, t0 = self._start
        if self.foreign_cores is None or self._end - t0 < 0.5:
            return False
        return self.foreign_cores + (self.steal_cores or 0.0) > limit


def wait_for_quiet(limit: float = 0.2, window: float = 0.5, max_wait: float = 300.0) -> float:
    """Wait (at most `max_wait` s) until other processes use less than `limit` cores over a
    `window`; returns the seconds waited. Called before each group of runs and before a redo."""
    waited = 0.0
    while waited < max_wait:
        with CpuMonitor() as monitor:
            time.sleep(window)
        if monitor.foreign_cores is None or monitor.foreign_cores + (monitor.steal_cores or 0.0) < limit:
            break
        waited += window
    return waited


def summary(values: list[float]) -> dict:
    """Median and spread of repeated measurements."""
    values = [v for v in values if v is not None]
    if not values:
        return {}
    out = {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4)
        out["iqr"] = q[2] - q[0]
    return out


# --------------------------------------------------------------------------------------------
# Machine


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
    faster than the sum here; the best of the two is a lower estimate of the memory's bandwidth.
    This machine's rate drifts by a third over minutes, so runs take a small sample next to them."""
    from epalm.model import can_pack

    n = max(1, int(gib * (1 << 30)) // 4 // 2048) * 2048  # whole rows of 2048 for the product
    nbytes = n * 4
    src = torch.empty(n, dtype=torch.float32, device=dev.device).uniform_()

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = dev.now()
            fn()
            times.append(dev.now() - t0)
        return min(times)

    out = {"buffer_bytes": nbytes}
    if copy:
        dst = torch.empty_like(src)
        out["copy_gbps"] = 2 * nbytes / best(lambda: dst.copy_(src)) / 1e9  # read + write
        del dst
    out["sum_gbps"] = nbytes / best(lambda: src.sum()) / 1e9
    if can_pack(src):
        packed = torch.ops.mkldnn._reorder_linear_weight(src.view(-1, 2048), 1)
        del src
        v = torch.randn(1, 2048)
        out["gemv_gbps"] = nbytes / best(lambda: torch.ops.mkldnn._linear_pointwise(v, packed, None, "none", [], "")) / 1e9
        del packed
    else:
        del src
    out["read_gbps"] = max(out["sum_gbps"], out.get("gemv_gbps", 0.0))
    return out


def bandwidth_probe(dev: Device, mib: int = 512) -> dict:
    """The quick sample of `memory_bandwidth` taken around each group of runs."""
    return memory_bandwidth(dev, gib=mib / 1024, copy=False)


def decode_weight_bytes(lm: OPTForCausalLM) -> int:
    """Bytes of weights one decode step must read: every decoder weight plus the (tied) head;
    the token and position embeddings are looked up (one row), not read."""
    decoder = lm.model.decoder
    skip = {id(decoder.embed_positions.weight)}
    total, seen = 0, set()
    for p in lm.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


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

    once()
    times = []
    for _ in range(repeats):
        t0 = dev.now()
        once()
        times.append(dev.now() - t0)
    return {"rows": rows, "seconds": min(times)}


# --------------------------------------------------------------------------------------------
# Runs


@dataclass
class TimedSession:
    """Wraps a decoding session and times its prefill (start) and each step."""

    inner: object
    dev: Device
    prefill_s: float | None = None
    steps_s: list[float] = field(default_factory=list)

    def start(self) -> torch.Tensor:
        t0 = time.perf_counter()
        logits = self.inner.start()
        self.dev.sync()
        self.prefill_s = time.perf_counter() - t0
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        logits = self.inner.step(tokens)
        self.dev.sync()
        self.steps_s.append(time.perf_counter() - t0)
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        self.inner.reorder(index)


@contextlib.contextmanager
def timed_sessions(dev: Device) -> Iterator[list[TimedSession]]:
    """Every session `generate` opens inside the block is timed (prefill and steps)."""
    made: list[TimedSession] = []
    original = decoding._session

    def wrapped(*args, **kwargs):
        session = TimedSession(original(*args, **kwargs), dev)
        made.append(session)
        return session

    with mock.patch.object(decoding, "_session", wrapped):
        yield made


@dataclass
class Workload:
    """Everything one LM shape/dtype needs for eP-ALM runs."""

    lm: EPALM
    dev: Device
    injection: InjectionConfig
    encoders: dict[str, Encoder]  # family -> encoder
    adapters: dict[str, Adapter]  # family -> adapter
    inputs: dict[str, torch.Tensor]  # input name -> encoder input
    new_tokens: int = 29
    probe_mib: int = 512  # buffer of the bandwidth sample taken around each group of runs
    quiet_wait_s: float = 300.0  # longest wait for other processes to leave the CPU before a group

    def options(self, setting: str, use_cache: bool, new_tokens: int | None = None) -> DecodingOptions:
        n = self.new_tokens if new_tokens is None else new_tokens
        return DecodingOptions(**SETTINGS[setting], max_length=1 + n, eos_token_id=NO_EOS, use_cache=use_cache)

    def text(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([[2]], device=self.dev.device)  # BOS: a caption
        return ids, torch.ones_like(ids)


def measure_encoder(work: Workload, name: str, repeats: int, warmup: int = 1) -> dict:
    family, _ = INPUTS[name]
    encoder, x = work.encoders[family], work.inputs[name]
    times = []
    wait_for_quiet(max_wait=work.quiet_wait_s)
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = work.dev.now()
            encoder(x, work.injection.num_features)
            if i >= warmup:
                times.append(work.dev.now() - t0)
    return {"input": name, "shape": list(x.shape), "seconds": summary(times)}


@dataclass
class Group:
    """Repetitions of one measurement (`once(short)` -> one run's numbers)."""

    mode: str
    input: str | None
    setting: str
    once: Callable[[bool], dict]
    repeats: int
    retries: int = 2  # disturbed repetitions redone, at most, before one is kept (flagged)
    runs: list[dict] = field(default_factory=list)
    discarded: list[float] = field(default_factory=list)
    waited: float = 0.0

    @property
    def done(self) -> bool:
        return len(self.runs) >= self.repeats

    def result(self) -> dict:
        out = aggregate(self.runs)
        out.update(mode=self.mode, input=self.input, setting=self.setting)
        out["per_token_runs_s"] = [r["per_token_s"] for r in self.runs]
        out["bandwidth_gbps"] = [r["bandwidth_gbps"] for r in self.runs]
        out["discarded_disturbed_e2e_s"] = self.discarded
        out["kept_disturbed"] = sum(r["disturbed"] for r in self.runs)
        out["foreign_cores_max"] = max((r["foreign_cores"] or 0.0) for r in self.runs)
        out["waited_for_quiet_s"] = self.waited
        return out


def interleave(work: "Workload", groups: list[Group], warmup: int = 1, log: Callable[[str], None] | None = None) -> list[dict]:
    """Warm every group up (short runs), then time them round-robin, one repetition of each per
    round, so that the machine's drifts (this one's memory bandwidth moves between ~45 and ~80 GB/s
    over minutes) fall on every group alike. Before each repetition, wait for other processes to
    leave the CPU; a repetition they disturbed anyway is redone later (`retries` times at most).
    A read-bandwidth sample is taken at the start of each round."""
    for group in groups:
        group.waited += wait_for_quiet(max_wait=work.quiet_wait_s)
        for _ in range(warmup):
            group.once(True)
    while not all(group.done for group in groups):
        rate = bandwidth_probe(work.dev, work.probe_mib)["read_gbps"]
        for group in groups:
            if group.done:
                continue
            group.waited += wait_for_quiet(max_wait=work.quiet_wait_s)
            with CpuMonitor() as monitor:
                run = group.once(False)
            run.update(foreign_cores=monitor.foreign_cores, disturbed=monitor.disturbed(), bandwidth_gbps=rate)
            if run["disturbed"] and group.retries > 0:
                group.retries -= 1
                group.discarded.append(run["e2e_s"])
                continue
            group.runs.append(run)
            if log:
                log(f"{group.mode:<18} {group.input or '-':<8} {group.setting:<6} run {len(group.runs)}: "
                    f"e2e {run['e2e_s']:.2f}s per-token {run['per_token_s'] * 1e3:.0f}ms")
    return [group.result() for group in groups]


def epalm_group(work: Workload, name: str, setting: str, use_cache: bool, repeats: int, retries: int = 2, mode: str | None = None) -> Group:
    """Encoder -> adapter -> eP-ALM decoding, end to end; warm-up runs make 2 new tokens (enough
    to touch every weight and code path)."""
    family, _ = INPUTS[name]
    encoder, adapter, x = work.encoders[family], work.adapters[family], work.inputs[name]
    ids, mask = work.text()

    def once(short: bool) -> dict:
        options = work.options(setting, use_cache, new_tokens=min(2, work.new_tokens) if short else None)
        with work.dev.peak_memory() as mem, timed_sessions(work.dev) as sessions, torch.inference_mode():
            t0 = work.dev.now()
            features = encoder(x, work.injection.num_features)
            t1 = work.dev.now()
            prefix = adapter.prefix(features)
            t2 = work.dev.now()
            out = generate(work.lm, prefix, ids, mask, options)
            t3 = work.dev.now()
        session = sessions[0]
        new = out.sequences.shape[1] - ids.shape[1]
        return dict(
            encoder_s=t1 - t0,
            adapter_s=t2 - t1,
            prefill_s=session.prefill_s,
            first_token_s=(t2 - t0) + session.prefill_s,
            generate_s=t3 - t2,
            e2e_s=t3 - t0,
            new_tokens=new,
            per_token_s=(t3 - t2 - session.prefill_s) / max(new - 1, 1),
            step_median_s=statistics.median(session.steps_s) if session.steps_s else None,
            peak_bytes=mem["peak_bytes"],
            peak_delta_bytes=mem["peak_delta_bytes"],
            ids=out.sequences[0].tolist(),
        )

    return Group(mode or ("cached" if use_cache else "uncached"), name, setting, once, repeats, retries)


def aggregate(runs: list[dict]) -> dict:
    """Median/min/max of every timing over the repetitions; ids of the last run (and whether all
    repetitions agreed)."""
    keys = [k for k in runs[0] if k.endswith("_s")]
    out = {k: summary([r[k] for r in runs]) for k in keys}
    out["tokens_per_s"] = summary([r["new_tokens"] / r["generate_s"] for r in runs])
    out["decode_tokens_per_s"] = summary([1 / r["per_token_s"] for r in runs])
    out["new_tokens"] = runs[-1]["new_tokens"]
    out["peak_bytes"] = max(r["peak_bytes"] for r in runs)
    out["peak_delta_bytes"] = max(r["peak_delta_bytes"] for r in runs)
    out["ids"] = runs[-1]["ids"]
    out["ids_stable"] = all(r["ids"] == runs[-1]["ids"] for r in runs)
    out["repeats"] = len(runs)
    return out


class _StepClock(LogitsProcessor):
    """Timestamps each decoding step of transformers' generate (called once per forward)."""

    def __init__(self, dev: Device) -> None:
        self.dev, self.stamps = dev, []

    def __call__(self, input_ids, scores):
        self.dev.sync()
        self.stamps.append(time.perf_counter())
        return scores


def hf_input(work: Workload) -> torch.Tensor:
    """Plain OPT gets as many prompt positions as eP-ALM prefills (visual + soft prompt + BOS), so
    both caches grow over the same lengths: BOS then random ids."""
    length = 1 + work.injection.prompt_len + 1
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, min(work.lm.config.vocab_size, 50000), (1, length), generator=g)
    ids[0, 0] = 2
    return ids.to(work.dev.device)


def hf_group(work: Workload, setting: str, repeats: int, retries: int = 2, mode: str = "hf_generate") -> Group:
    """transformers `OPTForCausalLM.generate` with its KV cache on the same weights object, same
    dtype, beams and number of new tokens (EOS suppressed by min_new_tokens)."""
    ids = hf_input(work)
    beams = SETTINGS[setting]["num_beams"]

    def once(short: bool) -> dict:
        n = min(2, work.new_tokens) if short else work.new_tokens
        clock = _StepClock(work.dev)
        with work.dev.peak_memory() as mem, torch.inference_mode():
            t0 = work.dev.now()
            out = work.lm.lm.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                num_beams=beams,
                do_sample=False,
                use_cache=True,
                pad_token_id=1,
                logits_processor=LogitsProcessorList([clock]),
            )
            t1 = work.dev.now()
        new = out.shape[1] - ids.shape[1]
        prefill = clock.stamps[0] - t0
        steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
        return dict(
            prefill_s=prefill,
            first_token_s=prefill,
            generate_s=t1 - t0,
            e2e_s=t1 - t0,
            new_tokens=new,
            per_token_s=(t1 - t0 - prefill) / max(new - 1, 1),
            step_median_s=statistics.median(steps) if steps else None,
            peak_bytes=mem["peak_bytes"],
            peak_delta_bytes=mem["peak_delta_bytes"],
            ids=out[0].tolist(),
        )

    return Group(mode, None, setting, once, repeats, retries)


@torch.inference_mode()
def profile_step(work: Workload, setting: str, top: int = 12) -> dict:
    """torch.profiler over one cached decode step (after prefill and a few steps): the top ops by
    self time, and the share of time in matrix products."""
    from torch.profiler import ProfilerActivity, profile

    family = "image" if "image" in work.encoders else next(iter(work.encoders))
    name = next(n for n, (f, _) in INPUTS.items() if f == family and n in work.inputs)
    ids, mask = work.text()
    prefix = work.adapters[family].prefix(work.encoders[family](work.inputs[name], work.injection.num_features))
    beams = SETTINGS[setting]["num_beams"]
    if beams > 1:
        prefix = prefix.repeat_interleave(beams)
        ids, mask = ids.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
    session = decoding.CachedSession(work.lm, ids, mask, prefix)
    logits = session.start()
    for _ in range(4):
        logits = session.step(logits.argmax(-1))
    tokens = logits.argmax(-1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if work.dev.cuda else [])
    with profile(activities=activities) as prof:
        t0 = work.dev.now()
        session.step(tokens)
        wall = work.dev.now() - t0
    events = prof.key_averages()
    attr = "self_device_time_total" if work.dev.cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    matmul_names = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn::_linear_pointwise")
    matmul = sum(getattr(e, attr) for e in events if e.key in matmul_names)
    return {
        "setting": setting,
        "rows": beams,
        "step_wall_s": wall,
        "ops": [
            {"op": e.key, "self_ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total, "calls": e.count}
            for e in rows
        ],
        "matmul_share": matmul / total,
    }


def adapter_memory(work: Workload, tasks: list[dict], dtype, device) -> dict:
    """One LM serving every base task (one adapter each, the encoders they need) against one task.
    Bytes from the parameters, plus the resident memory the extra adapters actually took."""
    lm_bytes = param_bytes(work.lm)
    encoder_dims = {family: enc.dim for family, enc in work.encoders.items()}
    encoder_bytes = {family: param_bytes(enc) for family, enc in work.encoders.items()}
    gc.collect()
    before = rss_bytes()
    adapters = []
    for i, task in enumerate(tasks):
        dim = encoder_dims.get(task["modality"], next(iter(encoder_dims.values())))
        adapters.append(build_adapter(task["injection"], dim, work.lm.lm, dtype, device, seed=i))
    gc.collect()
    rss_delta = rss_bytes() - before if device.type == "cpu" else None
    per_task = [param_bytes(a) for a in adapters]
    used_families = sorted({t["modality"] for t in tasks if t["modality"] in encoder_bytes})
    first = tasks[0]["modality"]
    one = lm_bytes + encoder_bytes.get(first, 0) + per_task[0]
    every = lm_bytes + sum(encoder_bytes[f] for f in used_families) + sum(per_task)
    del adapters
    gc.collect()
    return {
        "tasks": [t["id"] for t in tasks],
        "lm_bytes": lm_bytes,
        "encoder_bytes": encoder_bytes,
        "adapter_bytes": dict(zip([t["id"] for t in tasks], per_task)),
        "adapter_params": per_task[0] // torch.tensor([], dtype=dtype).element_size(),
        "one_task_bytes": one,
        "all_tasks_bytes": every,
        "all_adapters_bytes": sum(per_task),
        "all_adapters_rss_delta_bytes": rss_delta,
    }


def base_tasks(lm_name: str, injection: InjectionConfig) -> list[dict]:
    """The registry's tasks that run on OPT-2.7B (the base adapters), from checkpoints/tasks.yaml;
    their injection is mapped onto the benchmarked LM's depth."""
    tasks = []
    try:
        import yaml

        registry = yaml.safe_load((ROOT / "checkpoints" / "tasks.yaml").read_text())["tasks"]
        for task_id, task in registry.items():
            if "opt-2.7b" not in str(task.get("lm", {}).get("id", "")):
                continue
            inj = task.get("injection", {})
            tasks.append(
                {
                    "id": task_id,
                    "modality": task["modality"],
                    "injection": replace(
                        injection,
                        shared_connector=bool(inj.get("shared_connector", False)),
                        prompt_mlp=bool(inj.get("prompt_mlp", True)),
                    ),
                }
            )
    except Exception:  # registry missing or changed shape: the paper's 7 base tasks
        tasks = []
    if not tasks:
        names = ["image-caption", "image-vqa", "image-gqa", "video-caption", "video-qa-msrvtt", "video-qa-msvd", "audio-caption"]
        tasks = [{"id": n, "modality": n.split("-")[0], "injection": injection} for n in names]
    return tasks

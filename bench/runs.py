"""The runs: eP-ALM end to end (encoder, adapter, cached or uncached decoding), plain transformers
`generate` on the same weights, the encoders alone, a profile of one decode step and the memory of
serving every task. Decoding steps are timed through `generate`'s per-step callback.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bench.machine import bandwidth_probe
from bench.models import INPUTS, BenchTask, build_adapter, param_bytes
from bench.timing import CpuMonitor, Device, rss_bytes, summary, wait_for_quiet
from epalm.decoding import DecodingOptions
from epalm.encoders import Encoder
from epalm.engine import generate
from epalm.model import EPALM, Adapter, InjectionConfig
from epalm.original import generate_original

# Decoding settings: 29 new tokens after BOS (max_length 30), forced to full length because no
# id equals eos_token_id=-1 (the loops compare ids with it and never stop early).
NO_EOS = -1
SETTINGS = {
    "paper": dict(num_beams=3),
    "greedy": dict(num_beams=1),
}


class StepClock(LogitsProcessor):
    """Stamps the end of each decoding step: eP-ALM's `generate(..., callback=clock.tick)`, and
    transformers' generate with the clock as a logits processor (called once per forward)."""

    def __init__(self, dev: Device) -> None:
        self.dev, self.stamps = dev, []

    def tick(self, *_: object) -> None:
        self.dev.sync()
        self.stamps.append(time.perf_counter())

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.tick()
        return scores

    def decode_numbers(self, start: float, end: float, new_tokens: int) -> dict:
        """Prefill (to the first step's end), per-token time and step median of a decode timed from
        `start` to `end`."""
        prefill = self.stamps[0] - start
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return dict(
            prefill_s=prefill,
            generate_s=end - start,
            new_tokens=new_tokens,
            per_token_s=(end - start - prefill) / max(new_tokens - 1, 1),
            step_median_s=statistics.median(steps) if steps else None,
        )


@dataclass
class Workload:
    """Everything one LM shape/dtype needs for eP-ALM runs."""

    lm: EPALM
    dev: Device
    injection: InjectionConfig
    encoders: dict[str, Encoder]  # modality -> encoder
    adapters: dict[str, Adapter]  # modality -> adapter
    inputs: dict[str, torch.Tensor]  # input name -> encoder input
    new_tokens: int = 29
    probe_mib: int = 512  # buffer of the bandwidth sample taken around each group of runs
    quiet_wait_s: float = 300.0  # longest wait for other processes to leave the CPU before a group

    def options(self, setting: str, new_tokens: int | None = None) -> DecodingOptions:
        n = self.new_tokens if new_tokens is None else new_tokens
        return DecodingOptions(**SETTINGS[setting], max_length=1 + n, eos_token_id=NO_EOS)

    def text(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([[2]], device=self.dev.device)  # BOS: a caption
        return ids, torch.ones_like(ids)


def measure_encoder(work: Workload, name: str, repeats: int, warmup: int = 1) -> dict:
    modality, _ = INPUTS[name]
    encoder, x = work.encoders[modality], work.inputs[name]
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


def interleave(
    work: Workload, groups: list[Group], warmup: int = 1, log: Callable[[str], None] | None = None
) -> list[dict]:
    """Warm every group up (short runs), then time them round-robin, one repetition of each per
    round, so that the machine's drifts (a shared VM's memory bandwidth can move over minutes; see
    the notes in RESULTS.md) fall on every group alike. Before each repetition, wait for other processes to
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
                log(
                    f"{group.mode:<18} {group.input or '-':<8} {group.setting:<6} run {len(group.runs)}: "
                    f"e2e {run['e2e_s']:.2f}s per-token {run['per_token_s'] * 1e3:.0f}ms"
                )
    return [group.result() for group in groups]


def epalm_group(
    work: Workload, name: str, setting: str, use_cache: bool, repeats: int, retries: int = 2, mode: str | None = None
) -> Group:
    """Encoder -> adapter -> eP-ALM decoding, end to end; warm-up runs make 2 new tokens (enough
    to touch every weight and code path)."""
    modality, _ = INPUTS[name]
    encoder, adapter, x = work.encoders[modality], work.adapters[modality], work.inputs[name]
    ids, mask = work.text()

    def once(short: bool) -> dict:
        options = work.options(setting, new_tokens=min(2, work.new_tokens) if short else None)
        clock = StepClock(work.dev)
        with work.dev.peak_memory() as mem, torch.inference_mode():
            t0 = work.dev.now()
            features = encoder(x, work.injection.num_features)
            t1 = work.dev.now()
            prefix = adapter.prefix(features)
            t2 = work.dev.now()
            decode = generate if use_cache else generate_original  # the engine, or the original algorithm
            out = decode(work.lm, prefix, ids, mask, options, callback=clock.tick)
            t3 = work.dev.now()
        run = clock.decode_numbers(t2, t3, out.sequences.shape[1] - ids.shape[1])
        return dict(
            run,
            encoder_s=t1 - t0,
            adapter_s=t2 - t1,
            first_token_s=(t2 - t0) + run["prefill_s"],
            e2e_s=t3 - t0,
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
        clock = StepClock(work.dev)
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
        run = clock.decode_numbers(t0, t1, out.shape[1] - ids.shape[1])
        return dict(
            run,
            first_token_s=run["prefill_s"],
            e2e_s=t1 - t0,
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

    modality = "image" if "image" in work.encoders else next(iter(work.encoders))
    name = next(n for n, (m, _) in INPUTS.items() if m == modality and n in work.inputs)
    ids, mask = work.text()
    prefix = work.adapters[modality].prefix(work.encoders[modality](work.inputs[name], work.injection.num_features))
    beams = SETTINGS[setting]["num_beams"]
    if beams > 1:
        prefix = prefix.repeat_interleave(beams)
        ids, mask = ids.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
    logits, state = work.lm.prefill(ids, mask, prefix)
    for _ in range(4):
        logits = work.lm.step(state, logits.argmax(-1))
    tokens = logits.argmax(-1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if work.dev.cuda else [])
    with profile(activities=activities) as prof:
        t0 = work.dev.now()
        work.lm.step(state, tokens)
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


def adapter_memory(work: Workload, tasks: list[BenchTask], dtype: torch.dtype, device: torch.device) -> dict:
    """One LM serving every base task (one adapter each, the encoders they need) against one task.
    Bytes from the parameters, plus the resident memory the extra adapters actually took."""
    lm_bytes = param_bytes(work.lm)
    encoder_dims = {modality: enc.dim for modality, enc in work.encoders.items()}
    encoder_bytes = {modality: param_bytes(enc) for modality, enc in work.encoders.items()}
    gc.collect()
    before = rss_bytes()
    adapters = []
    for i, task in enumerate(tasks):
        dim = encoder_dims.get(task.modality, next(iter(encoder_dims.values())))
        adapters.append(build_adapter(task.injection, dim, work.lm.lm, dtype, device, seed=i))
    gc.collect()
    rss_delta = rss_bytes() - before if device.type == "cpu" else None
    per_task = [param_bytes(a) for a in adapters]
    used = sorted({t.modality for t in tasks if t.modality in encoder_bytes})
    one = lm_bytes + encoder_bytes.get(tasks[0].modality, 0) + per_task[0]
    every = lm_bytes + sum(encoder_bytes[m] for m in used) + sum(per_task)
    del adapters
    gc.collect()
    return {
        "tasks": [t.id for t in tasks],
        "lm_bytes": lm_bytes,
        "encoder_bytes": encoder_bytes,
        "adapter_bytes": dict(zip([t.id for t in tasks], per_task)),
        "adapter_params": per_task[0] // torch.tensor([], dtype=dtype).element_size(),
        "one_task_bytes": one,
        "all_tasks_bytes": every,
        "all_adapters_bytes": sum(per_task),
        "all_adapters_rss_delta_bytes": rss_delta,
    }

"""Training at the real shapes, the default schedule's cost, and what the defaults learn: `python bench/train.py`.

1. Steps. One training step is what `epalm.train` runs per batch: (the frozen encoder on the batch's
   media, unless its [CLS] features are cached) + the adapter + the frozen LM forward through
   eP-ALM's injected layers + backward into the adapter + an AdamW step on the adapter. Random
   weights at the real shapes (OPT-2.7B and ViT-B/16 by default; nothing downloaded), captions of
   `--text-tokens` tokens. Reported: step time (best and median over `--steps` timed steps after
   one warm-up step), samples/s, peak resident memory, the cached-features speed-up.
2. Schedule. The default recipe (`epalm.recipe.plan`) for 200, 2,000 and 20,000 captioned images:
   its length, and its wall time on this machine from the times measured here (encoding each file
   once, the steps at the plan's batch, the validations: a decode with the task's 3 beams per
   validation file, and the validation loss). On one GPU as an estimate from the same counts: the
   steps' FLOPs at an assumed sustained rate, each decode step reading the LM's weights at an
   assumed bandwidth (`--gpu-tflops`, `--gpu-gbps`).
3. Tiny. The held-out exact match of the default settings on the four synthetic tasks
   (`epalm.synthetic`) with the tiny models: image captions, image QA, audio, video.
The results are a section of bench/RESULTS.md (replacing an earlier one) and a JSON file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine_info  # noqa: E402
from bench.models import build_encoder_for as build_encoder  # noqa: E402
from bench.models import build_lm, encoder_input, injection_for  # noqa: E402
from bench.report import write_section  # noqa: E402
from bench.timing import CpuMonitor, reset_rss_peak, rss_bytes, rss_peak_bytes, wait_for_quiet  # noqa: E402
from epalm.data import MAX_HELD_OUT, held_out_count  # noqa: E402
from epalm.engine import generate  # noqa: E402
from epalm.model import EPALM, Adapter  # noqa: E402
from epalm.recipe import TrainConfig, plan  # noqa: E402
from epalm.store import DTYPES  # noqa: E402
from epalm.tasks import load_registry  # noqa: E402
from epalm.training import AdapterLoss  # noqa: E402

SECTION = "## Training throughput (bench/train.py)"
LM_BYTES = {"opt-2.7b": 2.65e9, "opt-6.7b": 6.66e9}  # parameters: bytes per dtype unit (the machine is shared)
FILES = (200, 2_000, 20_000)
SCHEDULE_TASK = "image-caption"
TINY_TASKS = {
    "image-caption": (".png", 8),
    "image-vqa": (".png", 8),
    "audio-caption": (".wav", 8),
    "video-caption": (".mp4", 6),
}
ENCODER_TOKENS = 197  # ViT-B/16 at 224 px: 196 patches + [CLS]


def available_bytes() -> float:
    """MemAvailable: what can be allocated without pushing other processes out (Linux; else unlimited)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def measure(
    lm: EPALM,
    encoder,
    adapter_config,
    batch: int,
    cached: bool,
    steps: int,
    text_tokens: int,
    gradient_checkpointing: bool,
    quiet_wait: float = 20.0,
) -> dict:
    """Step times (best and median) and peak memory of `steps` training steps after one warm-up
    step; before each, the bench waits (up to `quiet_wait` s) for other processes to leave the CPU."""
    torch.manual_seed(0)
    config = lm.config
    model = AdapterLoss(Adapter(adapter_config, encoder.dim, config.hidden_size, config.word_embed_proj_dim))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.02)
    media = encoder_input("image", batch, encoder.dtype, torch.device("cpu"), encoder)
    ids = torch.randint(4, config.vocab_size, (batch, text_tokens))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    with torch.no_grad():
        features = encoder(media, adapter_config.num_features).float()
    lm.checkpointing = gradient_checkpointing
    times, others = [], []
    reset_rss_peak()
    before = rss_bytes()
    for step in range(steps + 1):
        if step:
            wait_for_quiet(max_wait=quiet_wait)
        with CpuMonitor() as monitor:
            started = time.perf_counter()
            if not cached:
                with torch.no_grad():
                    features = encoder(media, adapter_config.num_features).float()
            loss = model(features, ids, mask, ids, lm).sum() / batch * 0.1
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
        if step:  # the first step warms up (allocations, oneDNN primitives)
            times.append(elapsed)
            others.append((monitor.foreign_cores or 0.0) + (monitor.steal_cores or 0.0))
    lm.checkpointing = False
    best = min(times)
    return {
        "batch": batch,
        "cached": cached,
        "gradient_checkpointing": gradient_checkpointing,
        "step_s": best,
        "median_step_s": statistics.median(times),
        "samples_per_s": batch / best,
        "others_cores": max(others),
        "peak_rss_gb": rss_peak_bytes() / 1e9,
        "peak_delta_gb": (rss_peak_bytes() - before) / 1e9,
        "steps": len(times),
    }


@torch.no_grad()
def measure_validation(lm: EPALM, encoder, adapter_config, repeats: int) -> dict:
    """Seconds per file of what a validation costs: the encoder (once per file, before training) and
    a decode with the task's own settings (the paper's 3 beams, max_length 30), best of `repeats`."""
    torch.manual_seed(0)
    config, task = lm.config, load_registry()[SCHEDULE_TASK]
    adapter = Adapter(adapter_config, encoder.dim, config.hidden_size, config.word_embed_proj_dim)
    media = encoder_input("image", 1, encoder.dtype, torch.device("cpu"), encoder)
    ids = torch.tensor([[2]])
    encode, decode, new_tokens = [], [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        features = encoder(media, adapter_config.num_features).float()
        encode.append(time.perf_counter() - started)
        started = time.perf_counter()
        output = generate(lm, adapter.prefix(features), ids, torch.ones_like(ids), task.generation)
        decode.append(time.perf_counter() - started)
        new_tokens = output.sequences.shape[1] - 1
    return {"encode_s": min(encode), "decode_s": min(decode), "decode_tokens": new_tokens}


def schedule(results: dict, args: argparse.Namespace) -> list[dict]:
    """The default recipe for each number of files (10% of them held out for validation), its wall time on
    this machine from the measured times, and on one GPU as an estimate (module docstring)."""
    task, rows = load_registry()[SCHEDULE_TASK], []
    sizes = results["sizes"]
    for dtype_name, timing in results["validation"].items():
        runs = [
            r for r in results["runs"] if r["dtype"] == dtype_name and r["cached"] and not r["gradient_checkpointing"]
        ]
        widest = max(runs, key=lambda r: r["batch"])
        for files in FILES:
            validation = held_out_count(files, TrainConfig.validation_fraction)
            recipe = plan(TrainConfig(), task, files - validation)
            per_sample = widest["step_s"] / widest["batch"]  # steps at the plan's batch: scaled per sample
            validations = sum(recipe.validates(epoch) for epoch in range(recipe.epochs)) + 1  # and one before
            # validation: a decode per file, and the loss: a forward, about a third of a training step
            per_validation = validation * (timing["decode_s"] + per_sample / 3)
            here = {
                "encode": files * timing["encode_s"],
                "train": recipe.total_steps * recipe.batch_size * per_sample,
                "validate": validations * per_validation,
            }
            gpu_sample = 4 * sizes["lm_params"] * sizes["tokens"] / (args.gpu_tflops * 1e12)
            gpu_decode = timing["decode_tokens"] * sizes["lm_bytes"][dtype_name] / (args.gpu_gbps * 1e9)
            gpu = {
                "encode": files * 2 * sizes["encoder_params"] * ENCODER_TOKENS / (args.gpu_tflops * 1e12),
                "train": recipe.total_steps * recipe.batch_size * gpu_sample,
                "validate": validations * validation * (gpu_decode + gpu_sample / 3),
            }
            rows.append(
                {
                    "dtype": dtype_name,
                    "files": files,
                    "recipe": recipe.recipe,
                    "epochs": recipe.epochs,
                    "steps": recipe.total_steps,
                    "batch": recipe.batch_size,
                    "validations": validations,
                    "here_s": here,
                    "gpu_s": gpu,
                }
            )
    return rows


def tiny_tasks(tasks: list[str]) -> list[dict]:
    """Train each synthetic task with the default settings on the tiny models; exact match on held-out files."""
    from epalm.pipeline import Pipeline
    from epalm.synthetic import QUESTION, write_colour_folder
    from epalm.training import train

    pipe, rows = Pipeline(device="cpu", tiny=True, pack_weights=False), []
    for base in tasks:
        suffix, per_colour = TINY_TASKS[base]
        qa = pipe.task(base).needs_question
        with tempfile.TemporaryDirectory() as folder:
            data = write_colour_folder(Path(folder) / "data", per_colour, suffix, qa=qa)
            held_out = write_colour_folder(Path(folder) / "held_out", 3, suffix, qa=qa, seed=1000)
            started = time.perf_counter()
            result = train(data, base, Path(folder) / "adapter", pipeline=pipe, progress=False)
            seconds = time.perf_counter() - started
            config = json.loads((Path(folder) / "adapter" / "adapter_config.json").read_text())["training"]["plan"]
            hits = []
            for line in (held_out / "metadata.jsonl").read_text().splitlines():
                row = json.loads(line)
                path, adapter = held_out / row["file_name"], str(Path(folder) / "adapter")
                answer = pipe.answer(path, QUESTION, adapter=adapter) if qa else pipe.caption(path, adapter=adapter)
                hits.append(answer.text == row.get("answer", row.get("text")))
        rows.append(
            {
                "task": base,
                "files": 4 * per_colour,
                "steps": config["total_steps"],
                "train_s": seconds,
                "validation_metric": f"{result.metric} {result.baseline:.2f} -> {result.best:.2f}",
                "held_out_exact_match": sum(hits) / len(hits),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    results = {
        "machine": machine_info(torch.device("cpu")),
        "lm": args.lm,
        "text_tokens": args.text_tokens,
        "runs": [],
        "validation": {},
        "sizes": {"lm_bytes": {}},
    }
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        needed = LM_BYTES.get(args.lm, 0) * dtype.itemsize * 1.15  # weights + encoder, activations, allocator
        if needed > available_bytes():
            results.setdefault("skipped", []).append(
                f"{dtype_name}: needs ~{needed / 1e9:.0f} GB, {available_bytes() / 1e9:.0f} GB were available"
            )
            print(f"skipped {dtype_name}: not enough free memory", flush=True)
            continue
        started = time.perf_counter()
        lm = EPALM(build_lm(args.lm, dtype, torch.device("cpu")))
        encoder = build_encoder(args.encoders, "image", dtype, torch.device("cpu"))
        injection = injection_for(args.lm)
        print(f"{args.lm} {dtype_name}: built in {time.perf_counter() - started:.0f} s", flush=True)
        sizes = results["sizes"]
        sizes["lm_params"] = sum(p.numel() for p in lm.parameters())
        sizes["encoder_params"] = sum(p.numel() for p in encoder.parameters())
        sizes["lm_bytes"][dtype_name] = sum(p.numel() * p.element_size() for p in lm.parameters())
        sizes["tokens"] = 1 + injection.prompt_len + args.text_tokens  # the visual token, the prompt, the text
        lm.lm.train()  # the paper recipe's dropout
        for batch in args.batches:
            for cached in (True, False):
                for checkpointing in (
                    [False, True] if args.checkpointing and cached and batch == max(args.batches) else [False]
                ):
                    row = measure(
                        lm,
                        encoder,
                        injection,
                        batch,
                        cached,
                        args.steps,
                        args.text_tokens,
                        checkpointing,
                        args.quiet_wait,
                    )
                    row["dtype"] = dtype_name
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
        lm.lm.eval()
        results["validation"][dtype_name] = measure_validation(lm, encoder, injection, args.steps)
        print(json.dumps({dtype_name: results["validation"][dtype_name]}), flush=True)
        del lm, encoder
    results["schedule"] = schedule(results, args) if results["runs"] else []
    results["tiny"] = tiny_tasks(args.tiny_tasks)
    results["gpu"] = {"tflops": args.gpu_tflops, "gbps": args.gpu_gbps}
    return results


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 48 * 3600 else f"{seconds / 86400:.1f} days"


def _parts(times: dict) -> str:
    total = sum(times.values())
    return f"**{_duration(total)}** ({' + '.join(_duration(times[k]) for k in ('encode', 'train', 'validate'))})"


def markdown(results: dict, minutes: float) -> str:
    machine = results["machine"]
    lines = [
        SECTION,
        "",
        f"Generated by `python bench/train.py` on {datetime.now():%Y-%m-%d %H:%M} ({minutes:.0f} min) on "
        f"{machine['cpu']}, {machine['torch_threads']} threads, torch {machine['torch']}. {results['lm']} shape with "
        f"random weights and the real ViT-B/16 shape (image input), captions of {results['text_tokens']} tokens, the "
        "paper's adapter (6 connectors + MLP prompt), AdamW; the LM in train mode (dropout). "
        "One step = encoder (uncached only) + forward + backward + optimizer step. Step s: the best of the timed steps "
        "after one warm-up (median in brackets), each started once other processes left the CPU; others: the most "
        "cores other processes took during a timed step (this machine is shared: above ~0.3 the time is inflated). "
        "Peak RSS: process high-water mark during the steps (Δ: above the resident size before them).",
        "",
        "| dtype (frozen weights) | batch | features | checkpointing | step s | samples/s | others | peak RSS GB "
        "| peak Δ GB | speed-up of caching |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = results["runs"]
    for row in runs:
        speedup = ""
        if row["cached"] and not row["gradient_checkpointing"]:
            twin = next(
                (r for r in runs if r["dtype"] == row["dtype"] and r["batch"] == row["batch"] and not r["cached"]), None
            )
            speedup = f"{twin['step_s'] / row['step_s']:.2f} x" if twin else ""
        lines.append(
            f"| {row['dtype']} | {row['batch']} | {'cached' if row['cached'] else 'encoded each step'} | "
            f"{'yes' if row['gradient_checkpointing'] else 'no'} | {row['step_s']:.2f} ({row['median_step_s']:.2f}) | "
            f"{row['samples_per_s']:.3f} | {row['others_cores']:.1f} | {row['peak_rss_gb']:.1f} | "
            f"{row['peak_delta_gb']:.2f} | {speedup} |"
        )
    lines += [f"\nNot measured: {reason}." for reason in results.get("skipped", [])]
    if results["schedule"]:
        gpu = results["gpu"]
        validation = results["validation"]
        measured = "; ".join(
            f"{d}: encode {v['encode_s']:.2f} s, validation decode {v['decode_s']:.1f} s ({v['decode_tokens']} tokens)"
            for d, v in validation.items()
        )
        lines += [
            "",
            f"The default schedule (`epalm.recipe.plan`, {SCHEDULE_TASK}; 10% of the files, at most "
            f"{MAX_HELD_OUT}, held out for validation) "
            f"and its wall time: encode each file once + train + validate (a 3-beam decode per validation file and "
            f"the validation loss, at every validation and once before training). This machine: from the times "
            f"measured above (steps at the plan's batch scaled per sample from the widest batch measured; per file "
            f"{measured}). One GPU, an estimate from the same counts: 4 x LM parameters x {results['sizes']['tokens']} "
            f"tokens FLOPs per training sample (forward, and the backward's activation gradients) at "
            f"{gpu['tflops']:g} TFLOP/s sustained, each decode step reading the LM's weights at {gpu['gbps']:g} GB/s "
            "(about an A10G at 40% of its bf16 peak and 80% of its bandwidth).",
            "",
            "| dtype | files | recipe | epochs | optimizer steps (batch) | validations | this machine: total "
            "(encode + train + validate) | one GPU, estimated |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in results["schedule"]:
            lines.append(
                f"| {row['dtype']} | {row['files']:,} | {row['recipe']} | {row['epochs']} | {row['steps']:,} "
                f"({row['batch']}) | {row['validations']} | {_parts(row['here_s'])} | {_parts(row['gpu_s'])} |"
            )
    if results["tiny"]:
        lines += [
            "",
            "The default settings on the tiny models (`python -m epalm train DATA --base TASK --tiny`), on the "
            "synthetic tasks of `epalm.synthetic` (4 colours or pitches, 10% held out for validation), then the "
            "inference path with the task's decoding on 12 other files:",
            "",
            "| task | files | optimizer steps | train s | validation metric (before -> best) | held-out exact match |",
            "|---|---|---|---|---|---|",
        ]
        for row in results["tiny"]:
            lines.append(
                f"| {row['task']} | {row['files']} | {row['steps']} | {row['train_s']:.0f} | "
                f"{row['validation_metric']} | {row['held_out_exact_match']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--lm", default="opt-2.7b", help="an LM shape of bench/models.py (opt-2.7b, opt-6.7b, ..., tiny)"
    )
    parser.add_argument("--encoders", default="real", help="encoder shapes: real, small or tiny")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--text-tokens", type=int, default=16, help="BOS + caption + EOS")
    parser.add_argument(
        "--checkpointing", action="store_true", help="also measure activation checkpointing at the largest batch"
    )
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--quiet-wait", type=float, default=20.0, help="max seconds to wait for an idle CPU before a step"
    )
    parser.add_argument("--gpu-tflops", type=float, default=50.0, help="the GPU estimate's sustained TFLOP/s")
    parser.add_argument("--gpu-gbps", type=float, default=480.0, help="the GPU estimate's sustained GB/s")
    parser.add_argument(
        "--tiny-tasks", nargs="*", default=list(TINY_TASKS), choices=list(TINY_TASKS), help="default: all four"
    )
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "train_results.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run(args)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    write_section(args.markdown, markdown(results, (time.perf_counter() - started) / 60))
    print(f"wrote {args.out} and the section '{SECTION[3:]}' of {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

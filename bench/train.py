"""Training throughput and memory at the real shapes: `python bench/train.py`.

One training step is what `epalm.train` runs per batch: (the frozen encoder on the batch's media,
unless its [CLS] features are cached) + the adapter + the frozen LM forward through eP-ALM's
injected layers + backward into the adapter + an AdamW step on the adapter. Random weights at the
real shapes (OPT-2.7B and ViT-B/16 by default; nothing downloaded), captions of `--text-tokens`
tokens. Reported: samples/s (median over `--steps` timed steps after one warm-up step), peak
resident memory during the steps, and the cached-features speed-up. The results are appended as a
section of bench/RESULTS.md (replacing an earlier one) and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
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
from epalm.model import EPALM, Adapter  # noqa: E402
from epalm.store import DTYPES  # noqa: E402
from epalm.training import AdapterLoss  # noqa: E402

SECTION = "## Training throughput (bench/train.py)"
LM_BYTES = {"opt-2.7b": 2.65e9, "opt-6.7b": 6.66e9}  # parameters: bytes per dtype unit (the machine is shared)


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
    lm.lm.train()  # the recipe's dropout
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
    lm.lm.eval()
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


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    results = {"machine": machine_info(torch.device("cpu")), "lm": args.lm, "text_tokens": args.text_tokens, "runs": []}
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
        del lm, encoder
    return results


def markdown(results: dict, minutes: float) -> str:
    machine = results["machine"]
    lines = [
        SECTION,
        "",
        f"Generated by `python bench/train.py` on {datetime.now():%Y-%m-%d %H:%M} ({minutes:.0f} min) on "
        f"{machine['cpu']}, {machine['torch_threads']} threads, torch {machine['torch']}. {results['lm']} shape with "
        f"random weights and the real ViT-B/16 shape (image input), captions of {results['text_tokens']} tokens, the "
        "paper's adapter (6 connectors + MLP prompt, 24.9 M trainable weights), AdamW; the LM in train mode (dropout). "
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--lm", default="opt-2.7b", help="an LM shape of bench/harness.py (opt-2.7b, opt-6.7b, ..., tiny)"
    )
    parser.add_argument("--encoders", default="real", help="encoder shapes: real, small or tiny")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--text-tokens", type=int, default=16, help="BOS + caption + EOS")
    parser.add_argument(
        "--checkpointing", action="store_true", help="also measure activation checkpointing at the largest batch"
    )
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--quiet-wait", type=float, default=20.0, help="max seconds to wait for an idle CPU before a step"
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

"""Throughput of `epalm eval` (items/s): one process against a local Ray cluster of 2 workers, and the
per-item cost it implies for the paper's benchmarks, on this machine and (estimated) on one GPU.

    python bench/eval.py                                         # OPT-2.7B shapes, every modality (hours on 2 cores)
    python bench/eval.py --lm opt-125m --encoders small --items 8   # a small setting (minutes)
    python bench/eval.py --device cuda --dtype bfloat16 --workers 1 # on a GPU: Ray with one worker per GPU

Random weights at the measured shapes (`bench.models.RandomSource`), the tiny tokenizer; nothing is
downloaded. The requests are what `epalm eval` sends for a benchmark: one per item, each a new file
(a perturbed copy of an example image, clip or recording, made before timing, so no encoder features
are reused), for a caption or the answer to a question, with the paper's decoding (3 beams) and a
fixed number of new tokens per task (`--tasks TASK:TOKENS`: random weights never stop early, so the
count stands for the benchmark's typical output: about 12 tokens for a caption, 3 for an answer). Both modes run
the same code as `eval` (`epalm.evaluation.Runner`): one process whose pipeline batches the
requests it gets from a thread pool; or Ray Data feeding 2 actors, one pipeline each, splitting the
machine's cores between them. Timings include building the models (random weights: no files read),
reported apart for the one-process run.

Ray's workers start and build their models in every run: its rate is given with them, and without
them: the wall of a run of one item per worker taken off the run's, over the items beyond those.

The full-benchmark table multiplies the one-process per-item cost (loading excluded) by each
benchmark's size. The GPU column is an estimate, not a measurement, and a lower bound: each decode
step reads every LM weight once, at 60% of an H100's 3.35 TB/s, and is shared by the requests in
flight (rows limit / beams); the encoder's FLOPs (counted here) run at 30% of its 989 TFLOP/s (bf16);
the rest (media decoding on the CPU, prefill, the per-step Python and kernel-launch overhead, scoring)
is left out. `--device cuda` measures it instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # `python bench/eval.py` puts bench/ first, not the repository

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import machine, models, report  # noqa: E402
from bench.serving import VARIANTS  # noqa: E402
from epalm.audio import prepare_audio  # noqa: E402
from epalm.evaluation import Request, Runner, predict  # noqa: E402
from epalm.image import prepare_image  # noqa: E402
from epalm.pipeline import Pipeline  # noqa: E402
from epalm.scale import connect  # noqa: E402
from epalm.video import prepare_video  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXAMPLES = {
    "image": sorted((ROOT / "examples" / "image").glob("*.jpg")),
    "video": sorted((ROOT / "examples" / "video").glob("*.mp4")),
    "audio": sorted((ROOT / "examples" / "audio").glob("*.mp3")),
}
PREPARE = {"image": prepare_image, "video": prepare_video, "audio": prepare_audio}
QUESTIONS = ["what is in the picture?", "what color is it?", "how many people are there?", "is it outside?"]
# The paper's benchmarks: (the task measured for it, items in its published evaluation split). GQA and MSVD-QA
# run the same models and decoding as VQAv2 and MSRVTT-QA: their measurement stands for them.
BENCHMARKS = {
    "COCO Karpathy test (captions)": ("image-caption", 5000),
    "VQAv2 val (questions)": ("image-vqa", 214354),
    "GQA test-dev (questions)": ("image-vqa", 12578),
    "MSR-VTT test (videos)": ("video-caption", 2990),
    "MSRVTT-QA test (questions)": ("video-qa-msrvtt", 72821),
    "MSVD-QA test (questions)": ("video-qa-msrvtt", 13157),
    "AudioCaps test (clips)": ("audio-caption", 975),
}
DEFAULT_WORKLOADS = ["image-caption:12", "image-vqa:3", "video-caption:12", "video-qa-msrvtt:3", "audio-caption:12"]
H100_BYTES_PER_S, H100_FLOPS = 0.6 * 3.35e12, 0.3 * 989e12


def make_requests(task: str, items: int, folder: Path) -> list[Request]:
    """One new file per item (made before any timing: a perturbed copy of an example of the task's
    modality, as costly to decode), with a question for QA tasks."""
    modality = task.split("-")[0]
    requests = []
    for n in range(items):
        example = EXAMPLES[modality][n % len(EXAMPLES[modality])]
        path = folder / f"{task}-{n:05d}{example.suffix}"
        VARIANTS[modality](example, path, np.random.default_rng(n))
        question = QUESTIONS[n % len(QUESTIONS)] if "-qa" in task or task.endswith("vqa") else None
        requests.append(Request(n, str(path), question))
    return requests


def measure(args: argparse.Namespace, task: str, new_tokens: int, requests: list[Request]) -> dict:
    """Both modes on the same requests; items/s and the predictions' agreement."""
    source = models.RandomSource(args.lm, args.encoders)
    settings = {"source": source, "device": args.device, "dtype": args.dtype, "max_batch_rows": args.max_rows}
    decoding = {"max_new_tokens": new_tokens}
    started = time.perf_counter()
    pipe = Pipeline(**settings)
    pipe.preload([task])
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    one = {p.key: p for p in predict(pipe, task, requests, decoding)}
    predict_s = time.perf_counter() - started
    encoder_flops = _encoder_flops(pipe, task, requests[0])
    weight_bytes = models.weight_bytes_estimate(args.lm, DTYPES[args.dtype])
    beams = pipe.decoding_options(pipe.task(task), None).num_beams
    del pipe
    gc.collect()  # one model in memory at a time: the Ray workers build their own
    result = {
        "task": task,
        "new_tokens": new_tokens,
        "items": len(requests),
        "one_process": {
            "load_s": load_s,
            "predict_s": predict_s,
            "items_per_s": len(requests) / predict_s,
            "items_per_s_with_load": len(requests) / (load_s + predict_s),
            "errors": sum(p.error is not None for p in one.values()),
        },
        "beams": beams,
        "encoder_flops": encoder_flops,
        "decode_weight_bytes": weight_bytes,
    }
    if args.workers:
        connect("local", settings)  # the cluster's own start, untimed (`--ray` pays it once per command)
        runner = Runner(settings, "local", args.workers)
        started = time.perf_counter()
        list(runner.run(task, requests[: args.workers], decoding))  # one item per worker: starting, loading
        start_s = time.perf_counter() - started
        started = time.perf_counter()
        ray = {p.key: p for p in runner.run(task, requests, decoding)}
        wall = time.perf_counter() - started
        result["ray"] = {
            "workers": args.workers,
            "wall_s": wall,
            "start_s": start_s,
            "items_per_s_with_load": len(requests) / wall,
            # every run starts its workers and builds their models: the short run's wall taken off
            "items_per_s": (len(requests) - args.workers) / (wall - start_s) if wall > start_s else None,
            "same_predictions": all(ray[k].answer == one[k].answer for k in one),
            "errors": sum(p.error is not None for p in ray.values()),
        }
    return result


def _encoder_flops(pipe: Pipeline, task: str, request: Request) -> float:
    """FLOPs of one encoder forward on one prepared input (torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = pipe.task(task)
    pixels = PREPARE[spec.modality](request.media, spec.preprocess).unsqueeze(0).to(pipe.dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        pipe.encoder(spec)(pixels, spec.injection.num_features)
    return float(counter.get_total_flops())


def gpu_item_s(run: dict, rows: int) -> float:
    """The estimate of one item's seconds on one H100 (module docstring)."""
    in_flight = max(1, rows // run["beams"])
    decode = run["new_tokens"] * run["decode_weight_bytes"] / H100_BYTES_PER_S / in_flight
    return decode + run["encoder_flops"] / H100_FLOPS


def markdown(results: dict) -> str:
    args = results["args"]
    lines = [
        "## Evaluation throughput: one process and Ray (bench/eval.py)",
        "",
        f"Run on {results['date']}: `{results['command']}`. Machine: {results['machine'].get('cpu', '?')}, "
        f"{results['machine'].get('cpu_count', '?')} cores, load average {results['load_average']} at the start. "
        f"LM shape {args['lm']}, encoders {args['encoders']}, {args['dtype']} on {args['device']}, random weights; "
        f"paper decoding (3 beams) with a fixed number of new tokens; rows limit {args['max_rows']}; each item a "
        "new file. Ray: a local cluster of "
        f"{args['workers']} workers sharing the machine. Loading is the models' build from random weights.",
        "",
        "| task | new tokens | items | one process items/s | (with loading) | load s | Ray items/s | (with start "
        "and loading) | same predictions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        one, ray = run["one_process"], run.get("ray")
        ray_cells = "- | - | -"
        if ray:
            steady = ray["items_per_s"]
            steady_cell = "-" if steady is None else f"{steady:.3f}"
            ray_cells = f"{steady_cell} | {ray['items_per_s_with_load']:.3f} | {ray['same_predictions']}"
        lines.append(
            f"| {run['task']} | {run['new_tokens']} | {run['items']} | {one['items_per_s']:.3f} | "
            f"{one['items_per_s_with_load']:.3f} | {one['load_s']:.0f} | {ray_cells} |"
        )
    by_task = {run["task"]: run for run in results["runs"]}
    lines += [
        "",
        "What a full benchmark would take at the one-process rate (loading excluded), and on one H100 (estimated, a",
        "lower bound: decode steps bound by reading the weights, shared by the requests in flight, and the encoder's",
        "FLOPs; media decoding, prefill and per-step overhead left out):",
        "",
        "| benchmark | items | s/item here | hours here | s/item one H100 (est.) | minutes one H100 (est.) |",
        "|---|---|---|---|---|---|",
    ]
    for name, (task, items) in BENCHMARKS.items():
        run = by_task.get(task)
        if run is None:
            lines.append(f"| {name} | {items} | not measured ({task}) | - | - | - |")
            continue
        here, gpu = 1 / run["one_process"]["items_per_s"], gpu_item_s(run, args["max_rows"])
        lines.append(
            f"| {name} | {items} | {here:.2f} | {here * items / 3600:.1f} | {gpu:.5f} | {gpu * items / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm", default="opt-2.7b", choices=list(models.LM_SHAPES))
    p.add_argument("--encoders", default="real", choices=models.ENCODER_FAMILIES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument(
        "--tasks",
        nargs="+",
        default=DEFAULT_WORKLOADS,
        metavar="TASK:TOKENS",
        help="tasks to measure, each with its new tokens per item (a COCO caption is about 12, a VQA answer 3; "
        f"default: {' '.join(DEFAULT_WORKLOADS)})",
    )
    p.add_argument("--items", type=int, default=32, help="items per task and mode")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (0: one process only)")
    p.add_argument("--max-rows", type=int, default=24)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the one process")
    p.add_argument("--out", default=str(ROOT / "bench" / "eval.json"))
    p.add_argument("--markdown", help="write the section into this file (e.g. bench/RESULTS.md)")
    args = p.parse_args(argv)
    args.workloads = []
    for entry in args.tasks:
        task, _, tokens = entry.partition(":")
        if task.split("-")[0] not in EXAMPLES or not tokens.isdigit():
            p.error(f"--tasks takes TASK:TOKENS (image-caption:12), not {entry!r}")
        args.workloads.append((task, int(tokens)))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {
        "command": "python bench/eval.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine.machine_info(torch.device(args.device)),
        "load_average": f"{os.getloadavg()[0]:.2f}",
        "args": {k: v for k, v in vars(args).items() if k != "workloads"},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="epalm-bench-eval-") as folder:
        for task, tokens in args.workloads:
            requests = make_requests(task, args.items, Path(folder))
            results["runs"].append(measure(args, task, tokens, requests))
            print(json.dumps(results["runs"][-1]), file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    text = markdown(results)
    print(text)
    if args.markdown:
        report.write_section(Path(args.markdown), text)
    failed = any(r["one_process"]["errors"] or (r.get("ray") or {}).get("errors") for r in results["runs"])
    different = any(not (r.get("ray") or {"same_predictions": True})["same_predictions"] for r in results["runs"])
    return 1 if failed or different else 0


if __name__ == "__main__":
    sys.exit(main())

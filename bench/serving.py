"""Many users at once: continuous batching against one request at a time, on new and on repeated media.

    python bench/serving.py                       # OPT-2.7B shape, real encoders, float32 and bfloat16 (~35 min)
    python bench/serving.py --dtype bfloat16 --clients 1 8 --new-tokens 6
    python bench/serving.py --media distinct      # new uploads only, every client count
    python bench/serving.py --lm tiny --encoders tiny --clients 1 2   # what the test runs

Each (dtype) runs in its own subprocess. One `Pipeline` serves the registry's base tasks from
random weights at the real shapes (`bench.models` builders; the text side uses the tiny tokenizer,
nothing is downloaded). N client threads each send `--requests` requests in a closed loop (the next
when the last is answered), cycling through image, video and audio captioning, all with the same
decoding (greedy, or the paper's 3 beams), `--new-tokens` each (random weights never stop early).
One-at-a-time takes a lock around each call, as the app's queue with `concurrency_limit=1` does;
batched lets every call reach the pipeline, whose scheduler shares the decode steps. Latency: a
request's submission to its final answer (waiting included). Both modes run on the same loaded
models, one after the other, per client count.

What the requests send (`--media`, both by default, each in its own tables):
- distinct: media no earlier request of the run sent, as new uploads are. Made before the models
  load, in a temporary folder removed at the end: each a copy of an example file with its own small
  perturbation (image: crop offset, brightness, noise; video: every frame shifted, brightened and
  noised, re-encoded with the example's codec at its size, frame rate, frame count and bit rate;
  audio: delay, gain, noise, re-encoded as the example's mp3), so decoding and the encoders cost
  what they cost for the example while nothing a pipeline keeps from earlier requests (such as
  cached encoder features) applies. The warm-up uses the example files, never these.
- examples: the example files themselves, again and again, as users clicking a demo's example
  buttons send: repeated media, where such caches do apply. Before each examples run the warm-up runs
  again (untimed), so both modes start with the examples' features kept. By default only at the largest client
  count (`--examples-clients` to change), which keeps the default run near 35 minutes on a 2-core CPU.

The cold start is measured by `bench/cold_start.py` (from `python app.py` to the first answer).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # `python bench/serving.py` puts bench/ first, not the repository

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench import machine, models, report  # noqa: E402
from epalm.pipeline import Pipeline  # noqa: E402
from epalm.store import DTYPES  # noqa: E402

CPU_DTYPES = [name for name in DTYPES if name != "float16"]  # float16 is for GPUs (the default there, with bf16)
REQUESTS = [  # (task, example file): image, video and audio captioning, cycled through
    ("image-caption", "examples/image/cat.jpg"),
    ("video-caption", "examples/video/cat_zoom.mp4"),
    ("audio-caption", "examples/audio/speech.mp3"),
]
SETTINGS = {"greedy": "fast", "paper": "paper"}  # setting -> preset
TARGET_CLIENTS = 8  # the targets are set at 8 concurrent clients
MEDIA = {  # --media choice -> what its requests send, as the report says it
    "distinct": "every request sends an image, clip or recording no earlier request of the run sent, as new "
    "uploads do: made before any timing from the example files, each with its own small crop, shift, brightness "
    "and noise (video: every frame; audio: gain, a delay and noise), saved in the example's format (JPEG, H.264 "
    "mp4, mp3) at its size, frame count, frame rate and length, so that decoding and the encoders cost what they "
    "cost for the example and nothing an earlier request left behind (such as cached encoder features) can be "
    "reused. The warm-up uses the example files only",
    "examples": "every request sends one of the example files, again and again, as users clicking a demo's "
    "example buttons do: what the pipeline keeps from an earlier request of the same file (such as its encoder "
    "features) can be reused, so these tables show repeated media, not new uploads. Before each run the example "
    "files are asked once more, untimed, so that both modes start with their features kept",
}


def _perturbed(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 pixels with a brightness change and a little noise."""
    return np.clip(pixels * rng.uniform(0.85, 1.15) + rng.normal(0.0, 2.0, pixels.shape), 0, 255).astype(np.uint8)


def image_variant(source: Path, target: Path, rng: np.random.Generator) -> None:
    """`source` cropped a few pixels off its edges at a random offset, scaled back to its size, perturbed: a JPEG."""
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    left, top = (int(v) for v in rng.integers(0, 9, size=2))
    image = image.crop((left, top, width - 8 + left, height - 8 + top)).resize((width, height))
    Image.fromarray(_perturbed(np.asarray(image), rng)).save(target, quality=90)


def video_variant(source: Path, target: Path, rng: np.random.Generator) -> None:
    """Every frame of `source` shifted a few pixels and perturbed, re-encoded with its codec at its size,
    frame rate, frame count and bit rate."""
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        codec, rate, bit_rate = stream.codec_context.codec.canonical_name, stream.average_rate, stream.bit_rate
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    shift = tuple(int(v) for v in rng.integers(-4, 5, size=2))
    with av.open(str(target), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.bit_rate = "yuv420p", bit_rate
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(_perturbed(np.roll(pixels, shift, axis=(0, 1)), rng), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def audio_variant(source: Path, target: Path, rng: np.random.Generator) -> None:
    """`source` delayed by up to 50 ms (same length), with another gain and a little noise, re-encoded with
    its codec at its sample rate, channels and bit rate."""
    with av.open(str(source)) as container:
        stream = container.streams.audio[0]
        codec, rate, bit_rate = stream.codec_context.codec.canonical_name, stream.rate, stream.bit_rate
        layout, sample_format = stream.layout.name, stream.format.name
        wave = np.concatenate([frame.to_ndarray() for frame in container.decode(stream)], axis=1)
    delay = int(rng.integers(1, rate // 20))
    wave = np.pad(wave, ((0, 0), (delay, 0)))[:, : wave.shape[1]] * rng.uniform(0.6, 1.0)
    wave = wave + rng.normal(0.0, 1e-3, wave.shape)
    with av.open(str(target), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        stream.bit_rate = bit_rate
        frame = av.AudioFrame.from_ndarray(wave.astype(np.float32), format=sample_format, layout=layout)
        frame.sample_rate = rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode())


VARIANTS = {"image": image_variant, "video": video_variant, "audio": audio_variant}


class DistinctMedia:
    """Files no earlier request sent: each a perturbed copy of an example file (its own seed), in
    `folder`, as costly to decode and encode as the example."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.made = folder, 0

    def make(self, source: Path, modality: str) -> Path:
        """A new file like `source`, an example of `modality` (image, video or audio)."""
        self.made += 1
        target = self.folder / f"{self.made:04d}-{source.name}"
        VARIANTS[modality](source, target, np.random.default_rng(self.made))
        return target


Plan = list[list[tuple[str, Path]]]  # per client, what it sends in order: (task, media file)


def plan(mix: list[tuple[str, str]], clients: int, requests: int, distinct: DistinctMedia | None) -> Plan:
    """Client i sends `requests` requests cycling through `mix` from its i-th entry: the example files,
    or with `distinct`, a new file made from the example for every request."""
    sent: Plan = []
    for index in range(clients):
        sent.append([])
        for j in range(requests):
            task, path = mix[(index + j) % len(mix)]
            media = distinct.make(ROOT / path, task.split("-")[0]) if distinct else ROOT / path
            sent[-1].append((task, media))
    return sent


def serve(pipe: Pipeline, sent: Plan, setting: str, new_tokens: int, batched: bool, frames: int | None) -> dict:
    """One client thread per entry of `sent`, each sending its requests in a closed loop; the latencies
    and the wall time."""
    clients = len(sent)
    pipe.batching = batched
    lock = threading.Lock() if not batched else None
    latencies: list[float] = []
    encoding: list[float] = []  # one-at-a-time: each answer's media and encoder seconds
    service: list[float] = []  # one-at-a-time: each answer's seconds holding the model
    errors: list[str] = []
    reused: list[bool] = []  # per answer: its encoder features came from the pipeline's cache
    start_barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        start_barrier.wait()
        for task, media in sent[index]:
            settings = dict(preset=SETTINGS[setting], max_new_tokens=new_tokens, num_frames=frames)
            started = time.perf_counter()
            try:
                if lock is not None:
                    with lock:
                        served = time.perf_counter()
                        answer = pipe.caption(media, task, **settings)
                        service.append(time.perf_counter() - served)
                        encoding.append(answer.timings.media_s + answer.timings.encode_s)
                else:
                    answer = pipe.caption(media, task, **settings)
            except Exception as exc:  # reported, not hidden: a failed request has no latency
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            reused.append(answer.timings.features_cached)

    rows: list[int] = []
    scheduler = pipe.scheduler(pipe.lm(pipe.task(sent[0][0][0]))[0])
    scheduler.callback = rows.append
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    scheduler.callback = None
    ordered = sorted(latencies)
    return {
        "mode": "batched" if batched else "one-at-a-time",
        "clients": clients,
        "setting": setting,
        "answers": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "answers_per_min": 60 * len(latencies) / wall if wall else 0.0,
        "p50_s": statistics.median(ordered) if ordered else None,
        "p95_s": _percentile(ordered, 0.95),
        "steps": len(rows),
        "mean_rows": statistics.mean(rows) if rows else 0.0,
        "max_rows": max(rows) if rows else 0,
        "encoder_share": sum(encoding) / sum(service) if service else None,
        "features_reused": sum(reused),
    }


def _percentile(ordered: list[float], q: float) -> float | None:
    """Linear interpolation between order statistics (numpy's default)."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def clients_for(args: argparse.Namespace, media: str) -> list[int]:
    """The client counts `media` runs with: `--clients`; for the examples, `--examples-clients`, by
    default the largest client count when distinct media run too."""
    if media == "examples" and args.examples_clients:
        return args.examples_clients
    if media == "examples" and "distinct" in args.media:
        return [max(args.clients)]
    return args.clients


def warm_up(pipe: Pipeline, mix: list[tuple[str, str]], frames: int | None) -> None:
    """One short caption of each example file, untimed: the first calls of each encoder and of the LM,
    and the example files' features in the pipeline's cache (the distinct runs push them out of it)."""
    for task, path in mix:
        pipe.caption(ROOT / path, task, preset="fast", max_new_tokens=2, num_frames=frames)


def run_dtype(args: argparse.Namespace, dtype: str) -> dict:
    """Make the distinct media, load once, warm up on the example files, then every (media, setting,
    clients) in both modes."""
    torch.set_num_threads(args.threads)
    mix = [(task, path) for task, path in REQUESTS if task.split("-")[0] in args.modalities]
    with tempfile.TemporaryDirectory(prefix="epalm-serving-media-") as folder:
        started = time.perf_counter()
        distinct = DistinctMedia(Path(folder))
        plans = {  # (media, setting, clients, batched) -> what each client sends, made before any timing
            (media, setting, clients, batched): plan(
                mix, clients, args.requests, distinct if media == "distinct" else None
            )
            for media in args.media
            for setting in args.settings
            for clients in clients_for(args, media)
            for batched in (False, True)
        }
        media_s = time.perf_counter() - started
        started = time.perf_counter()
        source = models.RandomSource(args.lm, args.encoders)
        pipe = Pipeline(device=args.device, dtype=dtype, source=source, max_batch_rows=args.max_rows)
        pipe.preload([task for task, _ in mix])
        load_s = time.perf_counter() - started
        warm_up(pipe, mix, args.frames)
        runs = []
        for (media, setting, _, batched), sent in plans.items():
            if media == "examples":  # both modes start with the examples' features kept, whatever ran before
                warm_up(pipe, mix, args.frames)
            run = {"media": media, **serve(pipe, sent, setting, args.new_tokens, batched, args.frames)}
            print(json.dumps(run), file=sys.stderr, flush=True)
            runs.append(run)
    return {"dtype": dtype, "load_s": load_s, "media_files": distinct.made, "media_s": media_s, "runs": runs}


def markdown(results: dict) -> str:
    args = results["args"]
    lines = [
        "## Serving many users: continuous batching (bench/serving.py)",
        "",
        f"Run on {results['date']} ({results['wall_s'] / 60:.0f} min): `{results['command']}`. "
        f"Machine: {results['machine'].get('cpu', '?')}, {results['machine'].get('cpu_count', '?')} cores, load "
        f"average {results.get('load_average', '?')} at the start, torch threads {args['threads']}"
        f"{_gpu(results['machine'])}. LM shape {args['lm']}, encoders {args['encoders']}, random "
        f"weights{', packed (oneDNN) as the pipeline does on CPU' if args.get('device', 'cpu') == 'cpu' else ''}. "
        f"Requests cycle {' / '.join(args['modalities'])} "
        f"captioning (video: {args['frames'] or 16} frames), {args['new_tokens']} new tokens "
        f"each, {args['requests']} per client in a closed loop. Latency = submission to final answer (queueing "
        f"included). Rows limit {args['max_rows']}. What the requests send:",
        "",
        *(f"- **{media}**: {MEDIA[media]}." for media in args["media"]),
        "",
    ]
    for block in results["dtypes"]:
        if "error" in block:
            lines += [f"### {block['dtype']}: failed", "", f"`{block['error']}`", ""]
            continue
        for media in args["media"]:
            lines += _table(block, media, [run for run in block["runs"] if run["media"] == media])
    return "\n".join(lines) + "\n"


def _table(block: dict, media: str, runs: list[dict]) -> list[str]:
    """One (dtype, media) table, its cache reuse, its encoder share and its targets (judged at 8 clients)."""
    made = (
        f", {block['media_files']} files made in {block['media_s']:.0f} s before timing" if media == "distinct" else ""
    )
    lines = [f"### {block['dtype']}, {media} media (models loaded in {block['load_s']:.0f} s{made})", ""]
    lines += [
        "| decoding | clients | mode | answers/min | p50 s | p95 s | steps | mean rows/step | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        alone = next(
            r
            for r in runs
            if r["setting"] == run["setting"] and r["clients"] == run["clients"] and r["mode"] == "one-at-a-time"
        )
        speedup = run["answers_per_min"] / alone["answers_per_min"] if alone["answers_per_min"] else 0.0
        lines.append(
            f"| {run['setting']} | {run['clients']} | {run['mode']} | {run['answers_per_min']:.1f} | "
            f"{_f(run['p50_s'])} | "
            f"{_f(run['p95_s'])} | {run['steps'] or '-'} | {_f(run['mean_rows'] if run['steps'] else None)} | "
            f"{speedup:.2f}x |" + (f" errors: {len(run['errors'])}" if run["errors"] else "")
        )
    lines.append("")
    answers, reused = sum(r["answers"] for r in runs), sum(r["features_reused"] for r in runs)
    lines.append(f"- Encoder features reused from the pipeline's cache: {reused} of {answers} answers.")
    shares = [r["encoder_share"] for r in runs if r.get("encoder_share") is not None]
    if shares:
        low, high = f"{min(shares):.0%}", f"{max(shares):.0%}"
        spread = low if low == high else f"{low}–{high}"
        lines.append(
            f"- One at a time, media decoding and the encoders (or, for media seen before, the cache lookup) take "
            f"{spread} of each answer's time: work that batching cannot share (requests waiting for one encoder run "
            "together, but a CPU encoder is compute-bound), so it bounds the speed-up."
        )
    for target, setting, factor in (
        ("8 concurrent greedy >= 4x one-at-a-time", "greedy", 4.0),
        ("8 concurrent paper (3 beams) >= 2x one-at-a-time", "paper", 2.0),
    ):
        pair = {r["mode"]: r for r in runs if r["setting"] == setting and r["clients"] == TARGET_CLIENTS}
        if {r["setting"] for r in runs} >= {setting} and len(pair) < 2:
            lines.append(f"- {target} ({media} media): not measured (no run at {TARGET_CLIENTS} clients)")
        elif len(pair) == 2 and pair["one-at-a-time"]["answers_per_min"]:
            ratio = pair["batched"]["answers_per_min"] / pair["one-at-a-time"]["answers_per_min"]
            p95 = (pair["batched"]["p95_s"] or 0) <= (pair["one-at-a-time"]["p95_s"] or 0)
            met = "met" if ratio >= factor and p95 else "missed"
            lines.append(
                f"- {target} ({media} media), p95 no worse: {ratio:.2f}x, p95 "
                f"{_f(pair['batched']['p95_s'])} vs {_f(pair['one-at-a-time']['p95_s'])} s: **{met}**"
            )
    return [*lines, ""]


def _gpu(info: dict) -> str:
    """', on <GPU name> (<memory> GB)' for a CUDA run, else nothing."""
    return f", on {info['gpu']} ({info['gpu_memory_bytes'] / 1e9:.0f} GB)" if "gpu" in info else ""


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm", default="opt-2.7b", choices=list(models.LM_SHAPES))
    p.add_argument("--encoders", default="real", choices=models.ENCODER_FAMILIES)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype", nargs="+", choices=list(DTYPES), help="default: float32 bfloat16 (cpu), float16 bfloat16 (cuda)"
    )
    p.add_argument(
        "--media",
        nargs="+",
        default=list(MEDIA),
        choices=list(MEDIA),
        help="distinct: every request sends new media (perturbed copies of the example files, made before timing); "
        "examples: the example files again and again (default: both)",
    )
    p.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8], metavar="N", help="concurrent client counts")
    p.add_argument(
        "--examples-clients",
        nargs="+",
        type=int,
        metavar="N",
        help="client counts for --media examples (default: the largest --clients count when distinct media run "
        "too, else every --clients count)",
    )
    p.add_argument("--modalities", nargs="+", default=["image", "video", "audio"], choices=["image", "video", "audio"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--new-tokens", type=int, default=12, help="a COCO caption is about 11 tokens")
    p.add_argument("--frames", type=int, help="video frames (default: the task's, 16 for video captioning)")
    p.add_argument("--max-rows", type=int, default=24)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(ROOT / "bench" / "serving.json"))
    p.add_argument("--markdown", help="write the section into this file (e.g. bench/RESULTS.md)")
    p.add_argument("--worker", metavar="DTYPE", help=argparse.SUPPRESS)
    p.add_argument("--in-process", action="store_true", help="no subprocess per dtype (tests)")
    args = p.parse_args(argv)
    if args.examples_clients and "examples" not in args.media:
        p.error("--examples-clients is for --media examples, which this run leaves out")
    if args.dtype is None:
        args.dtype = ["float16", "bfloat16"] if args.device == "cuda" else CPU_DTYPES
    return args


def _child(argv: list[str], dtype: str) -> dict:
    """One measurement in a fresh process (no two models in memory at once)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, *argv, "--worker", dtype, "--out", out.name]
        done = subprocess.run(command, stdout=subprocess.DEVNULL)
        if done.returncode:
            return {"dtype": dtype, "error": f"worker exited with {done.returncode}"}
        return json.loads(Path(out.name).read_text())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        Path(args.out).write_text(json.dumps(run_dtype(args, args.worker)))
        return 0
    started = time.perf_counter()
    child_argv = [a for a in argv if a != "--in-process"]
    if args.in_process:
        pick = functools.partial(run_dtype, args)
    else:
        pick = functools.partial(_child, child_argv)
    results = {
        "command": "python bench/serving.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine.machine_info(torch.device(args.device)),
        "args": vars(args),
        "load_average": f"{os.getloadavg()[0]:.2f}",
        "dtypes": [pick(dtype) for dtype in args.dtype],
    }
    results["wall_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(results, indent=1))
    text = markdown(results)
    print(text)
    if args.markdown:
        report.write_section(Path(args.markdown), text)
    return 0 if all("error" not in block for block in results["dtypes"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What `inspect=True` costs: showing what the model saw and how sure it was, at the real shapes.

    python bench/inspection.py                   # OPT-2.7B shape, bfloat16, CPU; image, video, audio (minutes)
    python bench/inspection.py --dtype float32   # needs ~15 GB of memory
    python bench/inspection.py --tiny            # tiny random models (what the test runs)

The same requests (the example files, paper beam search and greedy) go through `Pipeline.stream`
without and with `inspect=True`, alternately, on random weights at the real shapes (the text side
uses the tiny tokenizer: no download). Two figures per request:

- direct: the work only inspection does (on the media side: turning the encoder's input back into
  pictures, drawing the spectrogram, reading an audio file's duration; on the decoding side: the
  per-step trace, the prompt, the token probabilities and beams), as the pipeline's observer times it
  where it runs (wall seconds: `Pipeline.stream(observer=...)`), over the plain answer's CPU time
  divided by the usable cores. The denominator is a lower bound of the answer's wall time (no process
  runs faster than its CPU time spread over every core), so the figure is an upper bound on a quiet
  machine. Both sides decode the media with the same functions, so nothing else differs.
- A/B: the difference of the end-to-end wall-time medians; on a shared CPU, noisier than the effect.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # `python bench/inspection.py` puts bench/ first, not the repository


from bench import models as M  # noqa: E402
from bench.timing import wait_for_quiet  # noqa: E402
from epalm.pipeline import Pipeline  # noqa: E402

REQUESTS = [  # (task, example file)
    ("image-caption", "examples/image/cat.jpg"),
    ("video-caption", "examples/video/cat_zoom.mp4"),
    ("audio-caption", "examples/audio/speech.mp3"),
]
# A COCO caption is about 11 tokens: random weights never stop, so answers are cut there (BOS + 11).
SETTINGS = {"paper": dict(num_beams=3, max_new_tokens=11), "greedy": dict(num_beams=1, max_new_tokens=11)}


INSPECTION = {"inspect_media": "media", "inspect_decode": "decoding"}  # the observer's phases of inspection work


def answer_time(pipe: Pipeline, task: str, path: str, setting: str, inspect: bool) -> dict:
    """Wall and process CPU seconds of one whole request (media file to final answer), and the wall seconds
    of its inspection-only work by side, as the pipeline's observer reports them."""
    spent = {"media": 0.0, "decoding": 0.0}

    def observe(phase: str, seconds: float) -> None:
        if phase in INSPECTION:
            spent[INSPECTION[phase]] += seconds

    wall, cpu = time.perf_counter(), time.process_time()
    *_, final = pipe.stream(path, task, **SETTINGS[setting], inspect=inspect, observer=observe)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert (final.inspection is not None) == inspect
    return dict(wall=wall, cpu=cpu, new_tokens=final.timings.new_tokens, **spent)


def measure(
    pipe: Pipeline,
    repeats: int,
    log: Callable[[str], None],
    quiet_wait: float = 10.0,
    modalities: tuple[str, ...] = ("image", "video", "audio"),
) -> list[dict]:
    """One warm-up pair (it loads the models), then `repeats` alternating pairs per request."""
    requests = [(task, str(ROOT / path)) for task, path in REQUESTS if pipe.task(task).modality in modalities]
    cores = len(os.sched_getaffinity(0))
    rows = []
    for inspect in (True, False):
        answer_time(pipe, *requests[0], "greedy", inspect)
    for task, path in requests:
        for setting in SETTINGS:
            runs: dict[bool, list[dict]] = {True: [], False: []}
            for round_ in range(repeats):
                wait_for_quiet(max_wait=quiet_wait)
                for inspect in (False, True) if round_ % 2 else (True, False):  # alternate who goes first
                    runs[inspect].append(answer_time(pipe, task, path, setting, inspect))
            plain_cpu = min(r["cpu"] for r in runs[False])
            extra = {side: max(r[side] for r in runs[True]) for side in ("media", "decoding")}
            work = extra["media"] + extra["decoding"]
            wall = {inspect: statistics.median(r["wall"] for r in runs[inspect]) for inspect in runs}
            row = dict(
                task=task,
                file=str(Path(path).relative_to(ROOT)),
                setting=setting,
                new_tokens=runs[False][-1]["new_tokens"],
                cores=cores,
                plain_cpu_s=plain_cpu,
                plain_wall_s=wall[False],
                inspected_wall_s=wall[True],
                media_extra_ms=extra["media"] * 1e3,
                decoding_extra_ms=extra["decoding"] * 1e3,
                direct_pct=100 * work / (plain_cpu / cores),
                ab_pct=100 * (wall[True] - wall[False]) / wall[False],
                repeats=repeats,
            )
            log(
                f"{task} {setting}: plain {plain_cpu:.2f} CPU s ({wall[False]:.2f} s wall), inspection work "
                f"{work * 1e3:.1f} ms ({row['direct_pct']:.2f} %), A/B {row['ab_pct']:+.1f} %"
            )
            rows.append(row)
    return rows


def markdown(rows: list[dict], lm: str, dtype: str) -> str:
    lines = [
        f"| request ({lm}, {dtype}) | decoding | new tokens | answer CPU s | media +ms | decoding +ms | "
        "direct overhead | answer wall s | with inspect wall s | A/B difference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} `{Path(r['file']).name}` | {r['setting']} | {r['new_tokens']} | {r['plain_cpu_s']:.2f} | "
            f"{r['media_extra_ms']:.1f} | {r['decoding_extra_ms']:.1f} | **{r['direct_pct']:.2f} %** | "
            f"{r['plain_wall_s']:.2f} | {r['inspected_wall_s']:.2f} | {r['ab_pct']:+.1f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="opt-2.7b", choices=[k for k in M.LM_SHAPES if k != "tiny"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=1, help="timed pairs per request (after one warm-up pair)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models instead of the real shapes")
    parser.add_argument("--quiet-wait", type=float, default=10.0, help="wait up to this long for an idle CPU per round")
    modalities = ["image", "video", "audio"]
    parser.add_argument("--modalities", nargs="+", default=modalities, choices=modalities)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    source = None if args.tiny else M.RandomSource(args.lm)
    # the same media is asked about again and again: keeping no features makes every answer run its encoder
    pipe = Pipeline(device="cpu", dtype=args.dtype, tiny=args.tiny, source=source, feature_cache=0)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    rows = measure(pipe, args.repeats, log, args.quiet_wait, tuple(args.modalities))
    print(markdown(rows, "tiny" if args.tiny else args.lm, args.dtype))
    if args.out:
        args.out.write_text(json.dumps({"lm": args.lm, "dtype": args.dtype, "tiny": args.tiny, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

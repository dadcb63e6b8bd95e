"""What a running answer feels while a video joins the batch: the longest gap between two of its tokens.

    python bench/join_gap.py                      # OPT-2.7B shape, real encoders, bfloat16 (a few minutes)
    python bench/join_gap.py --dtype float32
    python bench/join_gap.py --lm tiny --encoders tiny --dtype float32   # what the test runs

One `Pipeline` on random weights at the real shapes (`bench.models.RandomSource`, nothing downloaded)
streams a greedy image caption; once it is under way, another thread asks for a 16-frame video caption.
Reported: the running answer's median gap between tokens before the video arrives, its longest gap
from the video's arrival to the video's first answer, and that answer's time. With the encoder run on the
scheduler's thread the running answer waits for the whole encoding; run on the caller's thread, it
keeps its steps. A token is a decode step of the batch (the scheduler's step callback): random weights decode
to ids the tiny tokenizer cannot spell, so the streamed text cannot mark them. It uses only `Pipeline.caption`
and that callback, which the versions before and after the one-engine change both have.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # `python bench/join_gap.py` puts bench/ first, not the repository

import torch  # noqa: E402

from bench import models  # noqa: E402
from epalm.pipeline import Pipeline  # noqa: E402

IMAGE, VIDEO = ROOT / "examples/image/cat.jpg", ROOT / "examples/video/cat_zoom.mp4"


def measure(pipe: Pipeline, new_tokens: int, join_after: int) -> dict:
    """The times of the batch's decode steps (each gives the running answer a token: random weights
    decode to ids the small tokenizer cannot spell, so its streamed text cannot mark them), and the
    video's submission and answer times."""
    pipe.caption(IMAGE, "image-caption", preset="fast", max_new_tokens=2)  # warm: the models are loaded
    pipe.caption(VIDEO, "video-caption", preset="fast", max_new_tokens=2)
    pipe.features.size = 0  # the video's encoder must run again
    arrivals: list[float] = []
    video: dict[str, float] = {}

    def join() -> None:
        video["submitted"] = time.perf_counter()
        pipe.caption(VIDEO, "video-caption", preset="fast", max_new_tokens=2)
        video["answered"] = time.perf_counter()

    joiner = threading.Thread(target=join)

    def step(rows: int) -> None:
        arrivals.append(time.perf_counter())
        if len(arrivals) == join_after:
            joiner.start()

    pipe.scheduler(pipe.lm(pipe.task("image-caption"))[0]).callback = step
    pipe.caption(IMAGE, "image-caption", preset="fast", max_new_tokens=new_tokens)
    joiner.join()
    before = [b - a for a, b in zip(arrivals, arrivals[1:]) if b < video["submitted"]]
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if video["submitted"] <= b <= video["answered"]]
    return {
        "median_gap_s": statistics.median(before),
        "longest_gap_while_joining_s": max(during) if during else None,
        "tokens_while_joining": len(during),
        "video_answer_s": video["answered"] - video["submitted"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="opt-2.7b", choices=list(models.LM_SHAPES))
    parser.add_argument("--encoders", default="real", choices=models.ENCODER_FAMILIES)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=120, help="the running answer's length")
    parser.add_argument("--join-after", type=int, default=5, help="the video joins after this many partial answers")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = Pipeline(device="cpu", dtype=args.dtype, source=models.RandomSource(args.lm, args.encoders))
    result = {"lm": args.lm, "dtype": args.dtype, **measure(pipe, args.new_tokens, args.join_after)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

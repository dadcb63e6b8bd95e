"""The GPU table: every benchmark that has a `--device cuda`, in one run, into bench/GPU.md.

    python bench/gpu.py                       # on a machine with a CUDA GPU (OPT-2.7B shape, fp16 and bf16)
    python bench/gpu.py --dtype bfloat16      # one dtype
    python bench/gpu.py --tiny --device cpu   # tiny shapes on the CPU: a smoke run (what the test runs)

Nothing here has run on a GPU yet (the project's machines have none): run it on one, commit bench/GPU.md and
bench/gpu/*.json, and update the README's list of what has not run on a GPU. In order, each in its own process
(the GPU's memory is free again between them):

1. `bench/run.py --device cuda`: decoding speed per token, first token, end to end and peak memory, cached
   against the original's uncached decoding and transformers' `generate`, image / video / audio, per dtype.
2. `bench/serving.py --device cuda`: 1, 2, 4 and 8 concurrent clients, batched against one at a time.
3. `bench/cold_start.py --device cuda`: `python app.py` to the first answer, the files in the Hub cache.

All use random weights at the real shapes (nothing is downloaded). A step that fails is reported and the
others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--lm", "tiny", "--encoders", "tiny"]  # the benchmarks' tiny shapes (their tests use the same)


def steps(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, command line) of each benchmark, writing its JSON into `args.folder` and its section into
    `args.markdown` (run.py first: it writes the file's head, the others add their sections)."""
    out, device, dtypes = Path(args.folder), ["--device", args.device], ["--dtype", *args.dtype]
    run = [*device, *dtypes, "--out", str(out / "results.json"), "--markdown", args.markdown]
    serving = [*device, *dtypes, "--clients", *map(str, args.clients), "--out", str(out / "serving.json")]
    cold = [*device, "--dtype", *args.dtype, "--out", str(out / "cold_start.json"), "--markdown", args.markdown]
    if args.tiny:  # every step and table, at the least work: one image setting, a few tokens, one repetition
        quick = ["--modalities", "image", "--settings", "greedy", "--new-tokens", "3"]
        run += [*TINY, *quick, "--repeats", "1", "--bandwidth-gib", "0.03", "--probe-mib", "8", "--quiet-wait", "0"]
        run += ["--no-profile", "--no-hf", "--no-pack"]
        serving += [*TINY, *quick, "--media", "examples", "--requests", "1"]
        cold += ["--layers", "2", "--new-tokens", "3"]
    serving += ["--markdown", args.markdown]
    return [
        ("bench/run.py", [sys.executable, str(ROOT / "bench" / "run.py"), *run]),
        ("bench/serving.py", [sys.executable, str(ROOT / "bench" / "serving.py"), *serving]),
        ("bench/cold_start.py", [sys.executable, "-m", "bench.cold_start", *cold]),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: only with --tiny, a smoke run")
    p.add_argument("--dtype", nargs="+", choices=["float16", "bfloat16", "float32"], help="default: float16 bfloat16")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8], metavar="N", help="serving client counts")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, few repetitions: checks that every step runs")
    p.add_argument("--folder", default=str(ROOT / "bench" / "gpu"), help="where each benchmark's JSON goes")
    p.add_argument("--markdown", default=str(ROOT / "bench" / "GPU.md"))
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        p.error("the GPU table needs --device cuda; --device cpu is for the --tiny smoke run")
    args.dtype = args.dtype or (["float16", "bfloat16"] if args.device == "cuda" else ["float32"])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False).", file=sys.stderr)
            return 2
    Path(args.folder).mkdir(parents=True, exist_ok=True)
    failed = []
    for name, command in steps(args):
        started = time.perf_counter()
        print(f"== {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if failed:
        done = f"the others are in {args.markdown}"
        print(f"bench/gpu.py: {', '.join(failed)} failed (see above); {done}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

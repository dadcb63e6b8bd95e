"""Peak memory of loading OPT-2.7B from its `.bin` checkpoint, as the Hub serves it (float16, no
safetensors), into the demo's dtype: the issue measured a 15.5 GiB peak for 11.1 GiB settled in
float32, over a free CPU Space's 16 GB.

    python -m bench.load [--layers 32] [--dtype float32] [--folder DIR] [--keep]

Writes a local folder in facebook/opt-2.7b's layout (its config, a float16 `pytorch_model.bin` of
random weights at the real shapes, 5.3 GB at 32 layers, and a tokenizer), then loads it once per
method, each in a fresh process, and prints the process's resident memory: before loading, at its
peak (VmHWM, which counts the checkpoint's pages a memory-mapped read touched), its own peak (RssAnon,
sampled: what the page cache cannot take back) and settled after the load.

- `transformers`: `OPTForCausalLM.from_pretrained(folder, dtype=...)`, what epalm did before;
- `epalm`: `epalm.pretrained.load_lm`, which reads the checkpoint and casts it tensor by tensor.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

METHODS = ("transformers", "epalm")


def write_repo(folder: Path, layers: int) -> int:
    """The checkpoint as the original conversion saved it (OPTModel's `decoder.*` keys, float16, no
    lm_head: it is tied), tensor by tensor from the meta model's shapes; returns its size in bytes."""
    from transformers import OPTModel

    from bench.models import lm_config
    from epalm.tiny import tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = lm_config("opt-2.7b")
    config.num_hidden_layers, config.dtype = layers, torch.float16  # as the Hub's config.json says
    config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # the tokenizer's size does not matter here
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in OPTModel(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.empty(v, dtype=torch.float16).normal_(0, 0.02, generator=generator) for k, v in shapes.items()}
    torch.save(state, folder / "pytorch_model.bin")
    return (folder / "pytorch_model.bin").stat().st_size


def _memory_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


class _AnonPeak(threading.Thread):
    """The highest RssAnon (the process's own memory, not the page cache's mapped file pages, which
    VmHWM counts too) seen every 5 ms until stopped: /proc keeps no high-water mark for it."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._done = 0.0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _memory_gib("RssAnon"))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return max(self.peak, _memory_gib("RssAnon"))


def measure(method: str, folder: Path, dtype: torch.dtype) -> dict:
    """Load in this process; its memory before, at the peak and settled, and the threads left."""
    from transformers import OPTForCausalLM

    from epalm.pretrained import load_lm

    gc.collect()
    before = _memory_gib("VmRSS")
    sampler = _AnonPeak()
    sampler.start()
    started = time.perf_counter()
    if method == "transformers":
        model = OPTForCausalLM.from_pretrained(folder, dtype=dtype)
    else:
        model, _ = load_lm("facebook/opt-2.7b", folder, [folder / "pytorch_model.bin"], dtype)
    seconds = time.perf_counter() - started
    anon_peak = sampler.stop()
    gc.collect()
    parameters = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    return {
        "method": method,
        "before_gib": before,
        "peak_gib": _memory_gib("VmHWM"),
        "anon_peak_gib": anon_peak,
        "settled_gib": _memory_gib("VmRSS"),
        "parameters_gib": parameters,
        "seconds": seconds,
        "threads": sorted(t.name for t in threading.enumerate()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = OPT-2.7B)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--folder", type=Path, help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)  # the child process's part
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.measure:
        print(json.dumps(measure(args.measure, args.folder, dtype)))
        return 0
    folder = args.folder or Path(tempfile.mkdtemp(prefix="opt-2.7b-random-"))
    try:
        if not (folder / "pytorch_model.bin").is_file():
            size = write_repo(folder, args.layers)
            print(f"wrote {folder} ({size / 2**30:.2f} GiB checkpoint, {args.layers} layers)", file=sys.stderr)
        columns = ["method", "dtype", "layers", "before", "peak", "own peak", "settled", "peak - settled", "parameters"]
        columns.append("load (s)")
        print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
        for method in args.methods:
            child = [sys.executable, "-m", "bench.load", "--measure", method, "--folder", str(folder)]
            out = subprocess.run([*child, "--dtype", args.dtype], check=True, capture_output=True, text=True).stdout
            result = json.loads(out.splitlines()[-1])
            left = [name for name in result["threads"] if "conversion" in name]
            print(
                f"| {method} | {args.dtype} | {args.layers} | {result['before_gib']:.2f} | {result['peak_gib']:.2f} | "
                f"{result['anon_peak_gib']:.2f} | "
                f"{result['settled_gib']:.2f} | {result['peak_gib'] - result['settled_gib']:.2f} | "
                f"{result['parameters_gib']:.2f} | {result['seconds']:.1f} |" + (f" running: {left}" if left else ""),
                flush=True,
            )
    finally:
        if not args.keep and not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

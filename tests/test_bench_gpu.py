"""bench/gpu.py, the one script that makes the GPU table: on the CPU at tiny shapes it runs every step
(bench/run.py, bench/serving.py, bench/cold_start.py) into one file, and its default command lines ask
each benchmark for CUDA in float16 and bfloat16 at 1-8 clients."""

from __future__ import annotations

import json
import sys

import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench import cold_start, gpu, serving
from bench import run as bench_run


def test_the_gpu_script_runs_every_benchmark_into_one_file(tmp_path):
    markdown = tmp_path / "GPU.md"
    argv = ["--tiny", "--device", "cpu", "--clients", "1", "2", "--folder", str(tmp_path), "--markdown", str(markdown)]
    assert gpu.main(argv) == 0
    text = markdown.read_text()
    headings = ["## Results", "## Serving many users", "## Cold start: `python app.py` to the first answer"]
    assert all(h in text for h in headings) and [text.index(h) for h in headings] == sorted(
        text.index(h) for h in headings
    )
    assert "| greedy | 2 | batched |" in text and "| float32 |" in text.split("## Cold start")[1]
    results = {
        name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("results", "serving", "cold_start")
    }
    assert [c["device"] for c in results["results"]["configurations"]] == ["cpu"]
    assert results["serving"]["args"]["device"] == "cpu" and results["cold_start"]["device"] == "cpu"
    assert results["cold_start"]["runs"][0]["answer_s"] > 0


def test_by_default_each_benchmark_is_asked_for_cuda_in_fp16_and_bf16():
    args = gpu.parse_args([])
    assert (args.device, args.dtype, args.clients) == ("cuda", ["float16", "bfloat16"], [1, 2, 4, 8])
    (_, run), (_, serve), (_, cold) = gpu.steps(args)
    parsed = [bench_run.parse_args(run[2:]), serving.parse_args(serve[2:]), cold_start.parse_args(cold[3:])]
    for step in parsed:
        assert step.device == "cuda" and step.dtype == ["float16", "bfloat16"], step
    assert parsed[0].lm == ["opt-2.7b"] and parsed[1].lm == "opt-2.7b" and parsed[2].layers == 32  # the real shapes
    assert parsed[1].clients == [1, 2, 4, 8]


def test_without_a_gpu_it_says_so(capsys):
    if torch.cuda.is_available():
        return
    assert gpu.main([]) == 2 and "no CUDA GPU here" in capsys.readouterr().err

"""The evaluation benchmark on tiny shapes: it measures every task it is given in one process (and with
Ray in bench runs: the Ray path itself is tested in test_scale.py), and its report extrapolates to the
paper's benchmarks only from what it measured."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, TINY_BENCH

sys.path.insert(0, str(ROOT))

from bench import eval as eval_bench


def test_eval_bench_measures_and_extrapolates(tmp_path):
    out, table = tmp_path / "eval.json", tmp_path / "RESULTS.md"
    table.write_text("# results\n")
    args = [*TINY_BENCH, "--tasks", "image-caption:2", "video-qa-msrvtt:2", "--items", "3", "--workers", "0"]
    assert eval_bench.main([*args, "--threads", "1", "--out", str(out), "--markdown", str(table)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["task"], r["new_tokens"], r["items"]) for r in runs] == [
        ("image-caption", 2, 3),
        ("video-qa-msrvtt", 2, 3),
    ]
    for run in runs:
        assert run["one_process"]["errors"] == 0 and run["one_process"]["items_per_s"] > 0 and "ray" not in run
        assert run["encoder_flops"] > 0 and run["beams"] == 3
    text = table.read_text()
    assert text.startswith("# results\n") and "## Evaluation throughput: one process and Ray" in text
    assert "| COCO Karpathy test (captions) | 5000 |" in text and "| MSVD-QA test (questions) | 13157 |" in text
    assert "| VQAv2 val (questions) | 214354 | not measured (image-vqa) |" in text


def test_eval_bench_refuses_an_unknown_workload():
    with pytest.raises(SystemExit):
        eval_bench.parse_args(["--tasks", "text-summary:3"])

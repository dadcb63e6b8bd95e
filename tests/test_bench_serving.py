"""The serving benchmark on tiny shapes: both modes answer every request, batched runs share steps,
and the tables, targets and cold-start parts are written."""

from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench import serving


def test_serving_bench_runs_both_modes_and_reports(tmp_path):
    out, table = tmp_path / "serving.json", tmp_path / "RESULTS.md"
    table.write_text("# results\n")
    args = [
        "--lm",
        "tiny",
        "--encoders",
        "tiny",
        "--dtype",
        "float32",
        "--clients",
        "1",
        "3",
        "--requests",
        "2",
        "--new-tokens",
        "4",
        "--threads",
        "1",
        "--cold-start",
        "--in-process",
        "--out",
        str(out),
        "--markdown",
        str(table),
    ]
    assert serving.main(args) == 0
    results = json.loads(out.read_text())
    [block] = results["dtypes"]
    runs = {(r["setting"], r["clients"], r["mode"]): r for r in block["runs"]}
    assert len(runs) == 2 * 2 * 2
    for run in runs.values():
        assert run["answers"] == run["clients"] * 2 and not run["errors"]
        assert 0 < run["p50_s"] <= run["p95_s"] and run["answers_per_min"] > 0
    assert runs[("paper", 3, "batched")]["max_rows"] > 3, "concurrent requests shared a step"
    assert runs[("greedy", 3, "one-at-a-time")]["steps"] == 0, "one at a time bypasses the scheduler"
    [cold] = results["cold_start"]
    parts = {"lm_read_and_convert_s", "pack_s", "image_encoder_build_s", "adapter_s", "first_answer_s"}
    assert set(cold["parts"]) == parts
    text = table.read_text()
    assert text.startswith("# results\n") and "## Serving many users" in text and "answers/min" in text
    assert "8 concurrent greedy >= 4x one-at-a-time (at 3 clients)" in text and "Cold start, float32" in text

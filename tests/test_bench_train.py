"""bench/train.py on tiny shapes: every configuration runs, the default schedule is costed for each
size, the tiny models' default training is measured, and the RESULTS.md section is replaced, not
repeated, on a second run."""

from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench import train as bench_train


def test_training_bench_runs_and_rewrites_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# eP-ALM benchmark results\n\n## Machine\n\nsomething\n")
    options = "--lm tiny --encoders tiny --dtypes float32 --batches 1 2 --steps 1 --checkpointing --quiet-wait 0"
    argv = options.split() + ["--markdown", str(results), "--out", str(tmp_path / "train.json")]
    assert bench_train.main([*argv, "--tiny-tasks"]) == 0
    assert bench_train.main([*argv, "--tiny-tasks", "image-vqa"]) == 0
    text = results.read_text()
    assert text.count(bench_train.SECTION) == 1 and text.startswith("# eP-ALM benchmark results\n\n## Machine")
    measured = json.loads((tmp_path / "train.json").read_text())
    runs = measured["runs"]
    assert len(runs) == 2 + 3  # cached and encoded per batch, checkpointing too at the largest
    assert all(r["samples_per_s"] > 0 and r["peak_rss_gb"] > 0 for r in runs)
    assert "| float32 | 2 | cached | no |" in text and " x |" in text
    schedule = measured["schedule"]
    assert [row["files"] for row in schedule] == [200, 2_000, 20_000] and all(
        row["recipe"] == "small" for row in schedule
    )
    assert all(sum(row["here_s"].values()) > 0 and sum(row["gpu_s"].values()) > 0 for row in schedule)
    assert "| float32 | 20,000 | small | 5 | 6,095 (16) |" in text and "one GPU, estimated |" in text
    [row] = measured["tiny"]  # the default settings, on the tiny models
    assert row["task"] == "image-vqa" and row["held_out_exact_match"] >= 0.9 and row["steps"] >= 300
    assert "| image-vqa | 32 | " in text

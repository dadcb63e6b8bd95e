"""The inspection-overhead benchmark on tiny models: it runs end to end and reports every figure."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench import inspection as bench_inspection


def test_the_overhead_bench_measures_both_ways(tmp_path, capsys):
    out = tmp_path / "inspection.json"
    argv = ["--tiny", "--dtype", "float32", "--repeats", "1", "--quiet-wait", "0", "--modalities", "image"]
    assert bench_inspection.main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["task"], r["setting"]) for r in rows] == [("image-caption", "paper"), ("image-caption", "greedy")]
    for row in rows:
        assert row["plain_cpu_s"] > 0 and row["inspected_wall_s"] > 0 and 1 <= row["new_tokens"] <= 11
        assert row["media_extra_ms"] > 0 and row["decoding_extra_ms"] > 0, "the inspection's own work was timed"
        extra_ms = row["media_extra_ms"] + row["decoding_extra_ms"]
        assert row["direct_pct"] == pytest.approx(extra_ms / 10 / (row["plain_cpu_s"] / row["cores"]))
    table = capsys.readouterr().out
    assert table.count("| image-caption `cat.jpg` |") == 2 and "direct overhead" in table

"""bench/decode_memory.py in its quick mode: both tables filled, from worker processes."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench import decode_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's memory from /proc")
def test_the_decode_memory_bench_measures_and_reports(tmp_path, capsys):
    out, results = tmp_path / "decode_memory.json", tmp_path / "RESULTS.md"
    results.write_text("# results\n")
    argv = ["--quick", "--clients", "1", "2", "--out", str(out), "--results", str(results)]
    assert decode_memory.main(argv) == 0
    data = json.loads(out.read_text())
    assert {(r["input"], r["clients"]) for r in data["memory"]} >= {("4 MP JPEG photo", 1), ("4 MP JPEG photo", 2)}
    assert all(r["peak"] > 0 and r["checkout"] == "this" for r in data["memory"])
    [row] = [r for r in data["fidelity"] if r["format"] == "JPEG"]
    assert row["decoded"] == "2500×2500" and row["max_levels"] <= 2, row  # read reduced, within 2 levels
    text = results.read_text()
    assert (
        text.startswith("# results\n")
        and "## Decoding large media: memory" in text
        and "| 4 MP JPEG photo | 2 |" in text
    )

"""The serving benchmark on tiny shapes: both modes answer every request on new and on repeated media,
batched runs share steps, and the tables and targets are written; its new media are new, valid inputs
that cost what the examples cost. The cold-start benchmark: the app's log gives each part."""

from __future__ import annotations

import itertools
import json
import sys
import tempfile

import av
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_BENCH

sys.path.insert(0, str(ROOT))

from bench import cold_start, serving
from epalm.audio import prepare_audio
from epalm.image import prepare_image
from epalm.video import prepare_video

PREPARE = {"image": prepare_image, "video": prepare_video, "audio": prepare_audio}


def test_serving_bench_runs_both_modes_on_both_media_and_reports(tmp_path, monkeypatch):
    out, table = tmp_path / "serving.json", tmp_path / "RESULTS.md"
    table.write_text("# results\n")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    args = [
        *TINY_BENCH,
        "--clients",
        "1",
        "3",
        "--requests",
        "2",
        "--new-tokens",
        "4",
        "--threads",
        "1",
        "--in-process",
        "--out",
        str(out),
        "--markdown",
        str(table),
    ]
    assert serving.main(args) == 0
    results = json.loads(out.read_text())
    [block] = results["dtypes"]
    runs = {(r["media"], r["setting"], r["clients"], r["mode"]): r for r in block["runs"]}
    assert len(runs) == len(block["runs"]) == 2 * 2 * 2 + 2 * 2, "distinct at 1 and 3 clients, examples at 3 only"
    assert {clients for media, _, clients, _ in runs if media == "examples"} == {3}
    assert block["media_files"] == 2 * 2 * (1 + 3) * 2, "a new file for every distinct request of the run"
    assert not list((tmp_path / "tmp").iterdir()), "the distinct media are removed at the end"
    for (media, *_), run in runs.items():
        assert run["answers"] == run["clients"] * 2 and not run["errors"]
        assert run["features_reused"] == (run["answers"] if media == "examples" else 0), "only repeated media reuse"
        assert 0 < run["p50_s"] <= run["p95_s"] and run["answers_per_min"] > 0
    for (
        media
    ) in serving.MEDIA:  # the rows of each step are counted (that they share steps: test_serving, test_pipeline)
        assert runs[(media, "paper", 3, "batched")]["max_rows"] >= 3 and runs[(media, "paper", 3, "batched")]["steps"]
        assert runs[(media, "greedy", 3, "one-at-a-time")]["steps"] == 0, "one at a time bypasses the scheduler"
    text = table.read_text()
    assert text.startswith("# results\n") and "## Serving many users" in text and "answers/min" in text
    for media in serving.MEDIA:
        assert f"### float32, {media} media" in text and f"- **{media}**: {serving.MEDIA[media]}." in text
        assert f"8 concurrent greedy >= 4x one-at-a-time ({media} media): not measured (no run at 8 clients)" in text
    assert "- Encoder features reused from the pipeline's cache: 0 of 32 answers." in text  # distinct
    assert "- Encoder features reused from the pipeline's cache: 24 of 24 answers." in text  # examples
    assert text.index("### float32, distinct media") < text.index("### float32, examples media")


def _client_counts(*argv: str) -> dict[str, list[int]]:
    args = serving.parse_args(list(argv))
    return {media: serving.clients_for(args, media) for media in args.media}


def test_examples_run_at_the_largest_client_count_unless_told():
    assert _client_counts("--clients", "1", "4", "2") == {"distinct": [1, 4, 2], "examples": [4]}
    assert _client_counts("--clients", "1", "4", "--examples-clients", "2", "4") == {
        "distinct": [1, 4],
        "examples": [2, 4],
    }
    assert _client_counts("--media", "examples", "--clients", "1", "4") == {"examples": [1, 4]}
    with pytest.raises(SystemExit):
        serving.parse_args(["--media", "distinct", "--examples-clients", "2"])


def test_distinct_media_are_new_valid_inputs_of_the_examples_kind_and_size(tmp_path):
    sent = serving.plan(serving.REQUESTS, 2, 3, serving.DistinctMedia(tmp_path))
    files = [media for requests in sent for _, media in requests]
    assert len(set(files)) == 6 and all(media.parent == tmp_path for media in files)
    assert len({media.read_bytes() for media in files}) == 6, "no two requests send the same bytes"
    examples = dict(serving.REQUESTS)
    for task, group in itertools.groupby(sorted(r for requests in sent for r in requests), key=lambda r: r[0]):
        example = ROOT / examples[task]
        made = [media for _, media in group]
        assert len(made) == 2 and all(media.suffix == example.suffix for media in made)
        prepare = PREPARE[task.split("-")[0]]
        tensors = [prepare(path) for path in (example, *made)]
        for a, b in itertools.combinations(tensors, 2):
            assert a.shape == b.shape and not torch.equal(a, b), task
        if example.suffix == ".jpg":
            assert all(Image.open(media).size == Image.open(example).size for media in made)
        else:
            assert [_stream(media) for media in made] == pytest.approx([_stream(example)] * 2, abs=0.06), task


def test_the_targets_are_judged_at_8_clients_only():
    def run(mode: str, clients: int, per_min: float, p95: float) -> dict:
        return dict(
            media="distinct", setting="greedy", mode=mode, clients=clients, answers=2 * clients, errors=[],
            answers_per_min=per_min, p50_s=1.0, p95_s=p95, steps=0, mean_rows=0.0, features_reused=0,
            encoder_share=None,
        )  # fmt: skip

    block = {"dtype": "float32", "load_s": 1.0, "media_files": 0, "media_s": 0.0}
    four = [run("one-at-a-time", 4, 10.0, 9.0), run("batched", 4, 50.0, 2.0)]
    eight = [run("one-at-a-time", 8, 10.0, 9.0), run("batched", 8, 39.0, 2.0)]
    text = "\n".join(serving._table(block, "distinct", four))
    assert "8 concurrent greedy >= 4x one-at-a-time (distinct media): not measured (no run at 8 clients)" in text
    text = "\n".join(serving._table(block, "distinct", four + eight))
    assert (
        "(distinct media), p95 no worse: 3.90x, p95 2.00 vs 9.00 s: **missed**" in text
        and "no worse: 5.00x" not in text
    )


def _stream(path):
    """A video's (width, height, frame rate, frames) or an audio's (sample rate, channels, seconds)."""
    with av.open(str(path)) as container:
        if container.streams.video:
            stream = container.streams.video[0]
            return stream.width, stream.height, float(stream.average_rate), stream.frames
        stream = container.streams.audio[0]
        return stream.rate, stream.channels, container.duration / av.time_base


def test_cold_start_parts_come_from_the_app_log():
    launched = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC, as the log's local time
    from datetime import datetime

    stamp = lambda s: datetime.fromtimestamp(launched + s).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]  # noqa: E731
    log = [
        f"{stamp(6.5)} epalm.store: Loading OPT-2.7B language model…",
        f"{stamp(6.6)} epalm.store: Mapping the bfloat16 weights of facebook/opt-2.7b kept from an earlier start",
        f"{stamp(10.3)} epalm.store: Packing the weights of OPT-2.7B for this CPU's matrix kernels…",
        f"{stamp(13.1)} epalm.store: packed 193 linear layers of facebook/opt-2.7b",
        f"{stamp(13.2)} epalm.store: Loading ViT-B/16 image encoder…",
        f"{stamp(14.0)} epalm.store: Loaded ViT-B/16 image encoder in 0.8 s",
        f"{stamp(14.0)} epalm.store: Loading COCO captions adapter (image-caption)…",
        f"{stamp(14.1)} epalm.store: Loaded COCO captions adapter (image-caption) in 0.1 s",
        "a line without a time",
    ]
    parts = cold_start.parts(log, launched)
    rounded = {name: {edge: round(at, 1) for edge, at in edges.items()} for name, edges in parts.items()}
    assert rounded == {
        "lm_read_and_cast": {"start": 6.6, "end": 10.3},
        "lm_pack": {"start": 10.3, "end": 13.1},
        "encoder": {"start": 13.2, "end": 14.0},
        "adapter": {"start": 14.0, "end": 14.1},
    }
    run = {"dtype": "bfloat16", "weights": "kept", "load_average": "1.50", "server_s": 7.0, "first_token_s": 14.7}
    run.update(answer_s=17.4, parts=parts)
    results = {"date": "d", "command": "c", "machine": {}, "threads": 2, "layers": 32, "new_tokens": 12}
    results.update(load_average="1.20", kept_gb={"bfloat16": 5.3})
    table = cold_start.markdown({**results, "cache_gb": 5.7, "runs": [run]})
    row = "| bfloat16 | kept | 1.50 | 7.0 | 6.6–10.3 | 10.3–13.1 | 13.2–14.0 | 14.0–14.1 | 14.7 | **17.4** |"
    assert row in table and "bfloat16 5.3 GB on disk" in table and "load average 1.20 at the start" in table


def test_the_join_gap_bench_runs_and_reports_its_numbers(capsys):
    from bench import join_gap

    assert join_gap.main([*TINY_BENCH[:4], "--dtype", "float32", "--new-tokens", "40", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["median_gap_s"] > 0 and result["video_answer_s"] > 0 and result["tokens_while_joining"] > 0

"""The imagefolder / audiofolder reader: splits, held-out fraction, bad rows with their lines."""

from __future__ import annotations

import json

import pytest

from epalm.data import DataError, decode_all, load_folder
from epalm.image import prepare_image
from epalm.media import MediaError

from conftest import write_colour_folder


def test_held_out_fraction_is_seeded_and_disjoint(tmp_path):
    root = write_colour_folder(tmp_path / "colours", per_colour=5)
    first, again = (
        load_folder(root, validation_fraction=0.2, seed=1),
        load_folder(root, validation_fraction=0.2, seed=1),
    )
    other = load_folder(root, validation_fraction=0.2, seed=2)
    assert first.kind == "caption" and len(first.validation) == 4 and len(first.train) == 16
    assert [e.path for e in first.validation] == [e.path for e in again.validation]
    assert [e.path for e in first.validation] != [e.path for e in other.validation]
    assert not {e.path for e in first.train} & {e.path for e in first.validation}
    assert first.train[0].answer.startswith("a ") and first.train[0].question is None


def test_a_file_with_several_captions_is_held_out_whole(tmp_path):
    """COCO-style rows (several captions per file): no file has rows on both sides of the split."""
    root = write_colour_folder(tmp_path / "colours", per_colour=5)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    extra = [{**row, "text": f"{row['text']} {word}"} for row in rows for word in ("thing", "one")]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows + extra))
    dataset = load_folder(root, validation_fraction=0.2, seed=1)
    held = {e.path for e in dataset.validation}
    assert len(held) == 4 and len(dataset.validation) == 12 and len(dataset.train) == 48
    assert not held & {e.path for e in dataset.train}


def test_split_folders_and_csv_qa(tmp_path):
    for split in ("train", "validation"):
        folder = write_colour_folder(tmp_path / "data" / split, per_colour=2, qa=True)
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        (folder / "metadata.jsonl").unlink()
        lines = ["file_name,question,answer"] + [f"{r['file_name']},{r['question']},{r['answer']}" for r in rows]
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    data = load_folder(tmp_path / "data")
    assert (
        data.kind == "qa"
        and len(data.train) == 8
        and len(data.validation) == 8
        and data.validation_source == "validation"
    )
    assert data.train[0].question == "what colour is it" and data.train[0].where.endswith("metadata.csv:2")


def test_bad_rows_are_reported_with_their_line_then_skipped_or_refused(tmp_path, caplog):
    root = write_colour_folder(tmp_path / "colours", per_colour=3)
    with (root / "metadata.jsonl").open("a") as out:
        out.write(json.dumps({"file_name": "gone.png", "text": "a red"}) + "\n")  # line 13
        out.write(json.dumps({"file_name": "red_0.png", "text": "  "}) + "\n")  # line 14
        out.write("{not json\n")  # line 15
    data = load_folder(root)
    assert [str(b).split("metadata.jsonl:")[1] for b in data.bad] == [
        "13: file not found: gone.png",
        "14: empty text",
        "15: not valid JSON (Expecting property name enclosed in double quotes)",
    ]
    assert len(data.train) + len(data.validation) == 12 and "skipping 3 bad rows" in caplog.text
    with pytest.raises(DataError, match=r"3 bad rows(.|\n)*metadata.jsonl:13: file not found"):
        load_folder(root, skip_bad=False)


def test_unreadable_files_are_found_before_training(tmp_path):
    root = write_colour_folder(tmp_path / "colours", per_colour=3)
    (root / "blue_1.png").write_bytes(b"\x89PNG but not really")
    data = load_folder(root, validation_fraction=0.25)
    seen = []
    decode_all(data, prepare_image, lambda example, pixels: seen.append(example.path.name), skip_bad=True)
    assert "blue_1.png" not in seen and len(seen) == 11
    assert "blue_1.png" not in {e.path.name for e in data.train + data.validation}
    assert "metadata.jsonl:8: unreadable file blue_1.png" in str(data.bad[-1])
    with pytest.raises(DataError, match="unreadable file blue_1.png"):
        decode_all(load_folder(root, validation_fraction=0.25), prepare_image, lambda *_: None, skip_bad=False)
    with pytest.raises(MediaError):
        prepare_image(root / "blue_1.png")


def test_missing_or_wrong_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no metadata.jsonl or metadata.csv"):
        load_folder(tmp_path / "empty")

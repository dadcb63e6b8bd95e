"""Training data through `datasets`: folders in the imagefolder convention (JSON lines, CSV, parquet;
splits), Hub-style datasets with their own columns, the held-out fraction, and every bad row
reported with where it is: paths leading out of the folder, missing files, empty texts, unreadable
media, text files that are not UTF-8."""

from __future__ import annotations

import io
import json
import os

import pytest

from epalm.data import Columns, DataError, decode_all, load_data
from epalm.image import prepare_image
from epalm.media import MediaError

from conftest import write_colour_folder


def rows_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_held_out_fraction_is_seeded_and_disjoint(tmp_path):
    root = write_colour_folder(tmp_path / "colours", per_colour=5)
    first, again = (load_data(root, "caption", validation_fraction=0.2, seed=1) for _ in range(2))
    other = load_data(root, "caption", validation_fraction=0.2, seed=2)
    assert first.kind == "caption" and len(first.validation) == 4 and len(first.train) == 16
    assert [e.media for e in first.validation] == [e.media for e in again.validation]
    assert [e.media for e in first.validation] != [e.media for e in other.validation]
    assert not {e.media for e in first.train} & {e.media for e in first.validation}
    assert first.train[0].answer.startswith("a ") and first.train[0].question is None
    assert first.validation_source == "4 files held out of the training split (20%, at most 500; seed 1)"


def test_at_most_so_many_files_are_held_out(tmp_path, monkeypatch):
    from epalm import data

    root = write_colour_folder(tmp_path / "colours", per_colour=5)
    monkeypatch.setattr(data, "MAX_HELD_OUT", 3)  # 500 in use: validating decodes each held-out file
    dataset = load_data(root, "caption", validation_fraction=0.5)
    assert len(dataset.validation) == 3 and len(dataset.train) == 17 and dataset.validation_source.startswith("3 files")


def test_a_file_with_several_captions_is_held_out_whole(tmp_path):
    """COCO-style rows (several captions per file): no file has rows on both sides of the split."""
    root = write_colour_folder(tmp_path / "colours", per_colour=5)
    rows = rows_of(root)
    extra = [{**row, "text": f"{row['text']} {word}"} for row in rows for word in ("thing", "one")]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows + extra))
    dataset = load_data(root, "caption", validation_fraction=0.2, seed=1)
    held = {e.key for e in dataset.validation}
    assert len(held) == 4 and len(dataset.validation) == 12 and len(dataset.train) == 48
    assert not held & {e.key for e in dataset.train}


def test_split_folders_and_a_csv_with_a_byte_order_mark(tmp_path):
    for split in ("train", "validation"):
        folder = write_colour_folder(tmp_path / "data" / split, per_colour=2, qa=True)
        rows = rows_of(folder)
        (folder / "metadata.jsonl").unlink()
        lines = ["file_name,question,answer"] + [f"{r['file_name']},{r['question']},{r['answer']}" for r in rows]
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8-sig")  # as Excel saves it
    data = load_data(tmp_path / "data", "qa")
    assert len(data.train) == 8 and len(data.validation) == 8 and data.validation_source == "validation"
    assert data.train[0].question == "what colour is it" and data.train[0].where == "train/metadata.csv row 1"


def test_a_csv_that_is_not_utf8_is_a_clear_error(tmp_path):
    root = write_colour_folder(tmp_path / "colours", per_colour=1)
    (root / "metadata.jsonl").unlink()
    (root / "metadata.csv").write_bytes("file_name,text\nred_0.png,un café rouge\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"cannot read .*metadata.csv: it is not UTF-8 text \(byte e9 at position"):
        load_data(root, "caption")


def test_captions_that_look_like_missing_values_stay_text(tmp_path):
    root = write_colour_folder(tmp_path / "colours", per_colour=1)
    answers = {"red": "None", "blue": "NA"}
    lines = ["file_name,question,answer"] + [f"{name}_0.png,is it,{answer}" for name, answer in answers.items()]
    (root / "metadata.jsonl").unlink()
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    data = load_data(root, "qa", validation_fraction=0.5)
    assert sorted(e.answer for e in data.train + data.validation) == ["NA", "None"]


def test_file_names_leading_out_of_the_folder_are_refused_with_every_bad_row(tmp_path, caplog):
    root = write_colour_folder(tmp_path / "colours", per_colour=3)
    (tmp_path / "secret.png").write_bytes(b"not yours")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(root / "red_0.png", root / "inside.png")  # a link within the folder is a file of the folder
    bad = [
        {"file_name": "../secret.png", "text": "a red"},  # row 13
        {"file_name": str(tmp_path / "secret.png"), "text": "a red"},
        {"file_name": "link.png", "text": "a red"},
        {"file_name": "gone.png", "text": "a red"},
        {"file_name": "red_0.png", "text": "  "},
        {"text": "a red"},
        {"file_name": "inside.png", "text": "a red"},
    ]
    with (root / "metadata.jsonl").open("a") as out:
        out.write("".join(json.dumps(row) + "\n" for row in bad))
    data = load_data(root, "caption")
    assert [str(b) for b in data.bad] == [
        f"metadata.jsonl row 13: file_name '../secret.png' leads outside the data folder {root}: refused",
        f"metadata.jsonl row 14: file_name '{tmp_path / 'secret.png'}' is absolute or a URL: refused (it must be a "
        "path relative to its metadata file)",
        f"metadata.jsonl row 15: file_name 'link.png' leads outside the data folder {root}: refused",
        "metadata.jsonl row 16: file not found: gone.png",
        "metadata.jsonl row 17: empty text",
        "metadata.jsonl row 18: no file_name",
    ]
    assert len(data.train) + len(data.validation) == 13
    assert "skipping 6 bad rows:\n  metadata.jsonl row 13" in caplog.text
    with pytest.raises(DataError, match=r"^6 bad rows \(without --refuse-bad they are skipped\):\n  metadata.jsonl"):
        load_data(root, "caption", skip_bad=False)


def test_unreadable_files_are_found_before_training_and_listed_once(tmp_path, caplog):
    root = write_colour_folder(tmp_path / "colours", per_colour=3)
    with (root / "metadata.jsonl").open("a") as out:
        out.write(json.dumps({"file_name": "gone.png", "text": "a red"}) + "\n")
    (root / "blue_1.png").write_bytes(b"\x89PNG but not really")
    data = load_data(root, "caption", validation_fraction=0.25)
    seen = []
    decode_all(data, prepare_image, lambda example, pixels: seen.append(example.name), skip_bad=True)
    assert "blue_1.png" not in seen and len(seen) == 11
    assert "blue_1.png" not in {e.name for e in data.train + data.validation}
    assert "metadata.jsonl row 8: unreadable file blue_1.png" in str(data.bad[-1])
    assert caplog.text.count("gone.png") == 1 and "skipping 1 more bad row:\n  metadata.jsonl row 8" in caplog.text
    with pytest.raises(DataError, match="unreadable file blue_1.png"):
        decode_all(load_data(root, "caption", validation_fraction=0.25), prepare_image, lambda *_: None, skip_bad=False)
    with pytest.raises(MediaError):
        prepare_image(root / "blue_1.png")


def test_missing_data_and_missing_columns_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="is neither a folder nor a Hub dataset id"):
        load_data(tmp_path / "nope", "caption")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no metadata.jsonl, .* and cannot be loaded as a dataset: "):
        load_data(tmp_path / "empty", "caption")
    root = write_colour_folder(tmp_path / "colours", per_colour=1)
    with pytest.raises(DataError, match=r"no 'question' or 'answer' column for a qa task \(name yours with"):
        load_data(root, "qa")
    with pytest.raises(DataError, match=r"has no split 'training'; its splits: train \(choose with --split\)"):
        load_data(root, "caption", split="training")
    columns = rows_of(root)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"image": r["file_name"], **r}) + "\n" for r in columns))
    assert load_data(root, "caption", columns=Columns(media="image"), validation_fraction=0.5).train


def write_dataset_repo(root, splits: dict[str, int]):
    """A dataset as the Hub stores one (parquet files under data/, images embedded as bytes), with its own
    column names: "image", "caption", and a class label."""
    import datasets
    from PIL import Image

    from conftest import COLOURS

    (root / "data").mkdir(parents=True)
    for split, per_colour in splits.items():
        images, captions, labels = [], [], []
        for c, (name, rgb) in enumerate(COLOURS.items()):
            for i in range(per_colour):
                buffer = io.BytesIO()
                Image.new("RGB", (16, 16), tuple(min(255, v + i) for v in rgb)).save(buffer, "PNG")
                images.append({"bytes": buffer.getvalue(), "path": f"{name}_{i}.png"})
                captions.append(f"a {name}")
                labels.append(c)
        rows = datasets.Dataset.from_dict({"image": images, "caption": captions, "label": labels})
        rows = rows.cast_column("image", datasets.Image())
        rows = rows.cast_column("label", datasets.ClassLabel(names=list(COLOURS)))
        rows.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_a_hub_style_dataset_with_its_own_columns(tmp_path):
    repo = write_dataset_repo(tmp_path / "someone" / "colours", {"train": 3, "test": 1})
    data = load_data(repo, "caption", columns=Columns(text="caption"))
    assert len(data.train) == 12 and len(data.validation) == 4 and data.validation_source == "test"
    first = data.train[0]
    assert first.answer == "a red" and first.name == "red_0.png" and first.where == f"{repo} [train] row 1"
    pixels = prepare_image(first.source())  # the file's bytes, as the inference path reads an upload
    assert pixels.shape == (3, 224, 224)
    assert len({e.key for e in data.train}) == 12, "each image its own features"
    labels = load_data(repo, "caption", split="test", columns=Columns(text="label"), validation_fraction=0.5)
    assert sorted(e.answer for e in labels.train + labels.validation) == ["blue", "green", "red", "white"]
    with pytest.raises(DataError, match=r"no 'text' column for a caption task \(name yours with --text-column\)"):
        load_data(repo, "caption")


def test_a_video_folder(tmp_path):
    root = write_colour_folder(tmp_path / "clips", per_colour=1, suffix=".mp4")
    data = load_data(root, "caption", validation_fraction=0.25)
    assert {e.name for e in data.train + data.validation} == {f"{c}_0.mp4" for c in ("red", "green", "blue", "white")}

"""`caption`/`ask` over a folder or a dataset into JSONL or Parquet, in one process (--tiny): every
input answered as it would be alone, in input order, and a re-run skips what is done."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from epalm.__main__ import main

from conftest import write_image

FAST = ["--tiny", "--task", "image-caption", "--preset", "fast", "--max-new-tokens", "4"]


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for n, name in enumerate(["b.jpg", "a.png", "more/c.jpg"]):
        write_image(folder / name, seed=n)
    (folder / "notes.txt").write_text("not a picture")
    return folder


@pytest.fixture()
def local_datasets(tmp_path, monkeypatch):
    """The datasets library offline, its cache in the test's folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def alone(capsys, *paths) -> dict[str, str]:
    """Each file captioned by the plain command, one at a time."""
    code, text, err = run(capsys, "caption", *FAST, *paths)
    assert code == 0, err
    return dict(line.split("\t") for line in text.splitlines())


def test_a_folder_into_jsonl_resumes(photos, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    code, text, err = run(capsys, "caption", photos, *FAST, "--out", out)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    files = [str(photos / name) for name in ("a.png", "b.jpg", "more/c.jpg")]
    assert sorted(r["key"] for r in rows) == files, "the folder's pictures, recursively, and nothing else"
    assert {r["key"]: r["answer"] for r in rows} == alone(capsys, *files)
    assert "3 answered, 0 failed" in err
    code, text, err = run(capsys, "caption", photos, *FAST, "--out", out)
    assert code == 0 and text == "" and len(out.read_text().splitlines()) == 3, "nothing asked again"
    assert alone(capsys, photos).keys() == set(files), "a folder works without --out too"


def test_a_dataset_into_parquet_in_input_order(photos, tmp_path, capsys, local_datasets):
    """A dataset folder in the imagefolder convention: `load_dataset` reads it as it reads a Hub dataset."""
    (photos / "metadata.csv").write_text("file_name,text\nb.jpg,x\na.png,y\nmore/c.jpg,z\n")
    out = tmp_path / "captions.parquet"
    code, _, err = run(capsys, "caption", "--dataset", photos, *FAST, "--out", out)
    assert code == 0, err
    rows = pq.read_table(out).to_pylist()
    assert [r["key"] for r in rows] == [0, 1, 2] and all(r["error"] is None for r in rows)
    captions = alone(capsys, *(photos / name for name in ("b.jpg", "a.png", "more/c.jpg")))
    assert [r["answer"] for r in rows] == list(captions.values())
    assert not (tmp_path / "captions.parquet.partial.jsonl").exists()
    code, text, _ = run(capsys, "caption", "--dataset", photos, *FAST, "--out", out)
    assert code == 0 and text == "", "the finished Parquet file counts as done"
    code, _, err = run(capsys, "caption", "--dataset", photos, "--column", "pixels", *FAST, "--out", out)
    assert code == 2 and "no column 'pixels'; its columns: image, text" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["caption", "--tiny", "--task", "image-caption", "x.jpg", "--ray"], "--ray and --dataset write their answers"),
        (
            ["caption", "--tiny", "--task", "image-caption", "x.jpg", "--dataset", "d", "--out", "o.jsonl"],
            "one of the two",
        ),
        (["caption", "--tiny", "--task", "image-caption", "--out", "o.jsonl"], "one of the two"),
        (["caption", "--tiny", "--task", "image-caption", "x.jpg", "--split", "test"], "are for --dataset"),
    ],
)
def test_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_an_output_that_is_neither_jsonl_nor_parquet_is_refused(photos, tmp_path, capsys):
    code, _, err = run(capsys, "caption", photos, *FAST, "--out", tmp_path / "captions.csv")
    assert code == 2 and "--out must end in .jsonl or .parquet" in err

"""Captions or answers for a whole folder or Hugging Face dataset, written to JSONL or Parquet.

    python -m epalm caption photos/ --task image-caption --out captions.parquet
    python -m epalm caption --dataset user/clips --split test --task video-caption --out clips.jsonl --ray
    python -m epalm ask --dataset user/photos --column image -q "what is shown" --task image-vqa --out a.jsonl

The files of a folder are those of the task's modality, found recursively, in sorted order; a
dataset's media column (an Image, Audio or Video feature, or file paths) is read undecoded, and
each file goes to the pipeline as it is stored, so the pipeline decodes it exactly as a file on
disk. Answers are appended as they come (for Parquet, to `FILE.partial.jsonl`, turned into the
Parquet file, in input order, at the end); a re-run skips the inputs already answered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import UserError
from .evaluation import Prediction, PredictionLog, Request, Runner

SUFFIXES = {
    "image": {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"},
    "video": {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"},
    "audio": {".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus"},
}
FORMATS = (".jsonl", ".parquet")


class BulkError(UserError, ValueError):
    """The folder, dataset or output file cannot be used as given."""


def media_files(paths: list[str], modality: str) -> list[str]:
    """`paths` with each folder replaced by the files of `modality` under it (recursively, sorted)."""
    found = []
    for path in paths:
        if not Path(path).is_dir():
            found.append(path)
            continue
        inside = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES[modality])
        if not inside:
            raise BulkError(f"{path} holds no {modality} files ({', '.join(sorted(SUFFIXES[modality]))})")
        found += inside
    return found


def dataset_requests(name: str, split: str | None, column: str | None, question: str | None) -> list[Request]:
    """One request per row of a Hub dataset (or a local dataset folder), keyed by row number, its
    media the stored file (bytes, or a local path)."""
    try:
        import datasets
    except ImportError:
        raise BulkError("--dataset needs the datasets library: pip install datasets") from None
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the library raises many kinds (not found, no such split, offline)
        raise BulkError(f"could not load the dataset {name!r}: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise BulkError(f"{name} has the splits {', '.join(loaded)}: choose one with --split")
        loaded = next(iter(loaded.values()))
    column = column or _media_column(loaded.features)
    if column not in loaded.features:
        raise BulkError(f"{name} has no column {column!r}; its columns: {', '.join(loaded.features)}")
    feature = loaded.features[column]
    if hasattr(feature, "decode"):  # Image, Audio, Video: the stored file, not the library's decoding of it
        loaded = loaded.cast_column(column, type(feature)(decode=False))
    requests = []
    for index, value in enumerate(loaded[column]):
        media = value.get("bytes") or value.get("path") if isinstance(value, dict) else value
        requests.append(Request(index, media, question))
    return requests


def _media_column(features: Any) -> str:
    for name, feature in features.items():
        if type(feature).__name__ in ("Image", "Audio", "Video"):
            return name
    for name in ("image", "video", "audio", "file_name", "path"):
        if name in features:
            return name
    raise BulkError(f"no image, video or audio column found: name it with --column ({', '.join(features)})")


def run_bulk(
    task: str, requests: list[Request], out: str | Path, runner: Runner, decoding: dict[str, Any]
) -> tuple[int, int]:
    """Answer `requests` into `out` (.jsonl or .parquet); (answered, failed) over all of them."""
    out = Path(out).expanduser()
    if out.suffix.lower() not in FORMATS:
        raise BulkError(f"--out must end in {' or '.join(FORMATS)}, not {out.name}")
    parquet = out.suffix.lower() == ".parquet"
    log = PredictionLog(out.with_name(out.name + ".partial.jsonl") if parquet else out)
    if parquet and out.is_file():  # a finished run's answers count as done too
        import pyarrow.parquet as pq

        for row in pq.read_table(out).to_pylist():
            log.entries.setdefault(row["key"], Prediction(row["key"], row["answer"], row["error"]))
    done = log.done
    todo = [r for r in requests if r.key not in done]
    for prediction in log.add(runner.run(task, todo, {k: v for k, v in decoding.items() if v is not None})):
        said = prediction.answer if prediction.error is None else f"ERROR: {prediction.error}"
        print(f"{prediction.key}\t{said}", flush=True)
    entries = [log.entries.get(r.key) for r in requests]
    answered = sum(1 for e in entries if e is not None and e.answer is not None)
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [
            {"key": r.key, "answer": e.answer if e else None, "error": e.error if e else "not predicted"}
            for r, e in zip(requests, entries)
        ]
        pq.write_table(pa.Table.from_pylist(rows), out)
        if log.path.is_file():
            os.remove(log.path)
    return answered, len(requests) - answered

"""Training data: a folder in the Hugging Face `imagefolder` / `audiofolder` convention.

    DATA/metadata.jsonl              {"file_name": "a.jpg", "text": "a red square"}
    DATA/a.jpg ...                   (or metadata.csv; QA rows have "question" and "answer")
    DATA/train/metadata.jsonl, DATA/validation/metadata.jsonl   (optional splits)

`file_name` is relative to the metadata file. Split folders are named as `datasets` names them
(train / validation, valid, val, dev / test, eval); with no validation or test split a seeded
fraction of the training files is held out (all of their rows). Every bad row (missing file, empty text, a file the
media layer cannot decode) is reported with its file and line, then skipped or refused.

The rows are read here rather than with `datasets.load_dataset("imagefolder")`: that decodes media
with its own decoders (Pillow, torchcodec for audio), while eP-ALM must see each file exactly as
the inference path prepares it (`epalm.image/video/audio`), and it stops at the first bad row
without saying which line it was.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .media import MediaError

log = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
TRAIN_SPLITS = ("train", "training")
VALIDATION_SPLITS = ("validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation")


class DataError(UserError, ValueError):
    """The training folder cannot be used as it is; the message says what to fix."""


@dataclass(frozen=True)
class Example:
    """One training row: a media file and its target text (caption, or question + answer)."""

    path: Path
    answer: str  # the caption, or the answer to `question`
    question: str | None = None
    where: str = ""  # "metadata.jsonl:12", for messages


@dataclass(frozen=True)
class BadRow:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Dataset:
    """The usable rows of each split and every row that was not usable."""

    root: Path
    kind: str  # "caption" or "qa"
    train: list[Example]
    validation: list[Example]
    validation_source: str  # the split folder, or "held out 10% of train's files (seed 42)"
    bad: list[BadRow] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "folder": str(self.root),
            "kind": self.kind,
            "train": len(self.train),
            "validation": len(self.validation),
            "validation_source": self.validation_source,
            "skipped_rows": len(self.bad),
        }


def _rows(metadata: Path) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, row or None, problem) for each data line of a metadata file."""
    if metadata.suffix == ".jsonl":
        with metadata.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, None, f"not valid JSON ({exc.msg})"
                    continue
                yield (number, row, "") if isinstance(row, dict) else (number, None, "not a JSON object")
        return
    with metadata.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            yield reader.line_num, row, ""


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if isinstance(value, list):  # several references: train on the first, as one caption per row
        value = value[0] if value else ""
    return str(value).strip() if value is not None else ""


def read_split(folder: Path, kind: str) -> tuple[list[Example], list[BadRow]]:
    """The rows of one split folder's metadata file; bad rows are returned, not raised."""
    found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if not found:
        raise DataError(
            f"{folder} has no metadata.jsonl or metadata.csv (rows of file_name + text, or + question/answer)"
        )
    if len(found) > 1:
        raise DataError(f"{folder} has both metadata.jsonl and metadata.csv; keep one")
    metadata = found[0]
    examples, bad = [], []
    for number, row, problem in _rows(metadata):
        where = f"{metadata}:{number}"
        if row is None:
            bad.append(BadRow(where, problem))
            continue
        file_name = _text(row, "file_name")
        if not file_name:
            bad.append(BadRow(where, "no file_name"))
            continue
        path = (metadata.parent / file_name).resolve()
        if not path.is_file():
            bad.append(BadRow(where, f"file not found: {file_name}"))
            continue
        if kind == "qa":
            question, answer = _text(row, "question"), _text(row, "answer")
            if not question or not answer:
                bad.append(BadRow(where, "empty question or answer"))
                continue
            examples.append(Example(path, answer, question, where))
        else:
            text = _text(row, "text").replace("</s>", "").strip()
            if not text:
                bad.append(BadRow(where, "empty text"))
                continue
            examples.append(Example(path, text, None, where))
    return examples, bad


def detect_kind(root: Path) -> str:
    """ "qa" when the first metadata file has question/answer columns, else "caption"."""
    for metadata in sorted(root.rglob("metadata.*")):
        if metadata.name in METADATA_FILES:
            for _, row, _ in _rows(metadata):
                if row is not None:
                    return "qa" if "question" in row and "answer" in row else "caption"
    raise DataError(f"no metadata.jsonl or metadata.csv under {root}")


def load_folder(
    root: str | Path, kind: str | None = None, validation_fraction: float = 0.1, seed: int = 42, skip_bad: bool = True
) -> Dataset:
    """Read a training folder. `kind`: "caption" or "qa" (default: from the columns). With
    `skip_bad=False` any bad row is an error naming every bad row."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"training data folder not found: {root}")
    kind = kind or detect_kind(root)
    train_dir = next((root / name for name in TRAIN_SPLITS if (root / name).is_dir()), None)
    val_dir = next((root / name for name in VALIDATION_SPLITS if (root / name).is_dir()), None)
    train, bad = read_split(train_dir or root, kind)
    if val_dir is not None:
        validation, val_bad = read_split(val_dir, kind)
        bad += val_bad
        source = val_dir.name
    else:
        if not 0 < validation_fraction < 1:
            raise DataError(f"validation fraction must be between 0 and 1, got {validation_fraction}")
        # whole files are held out: a file's other captions or questions in train would leak its answers
        files = list(dict.fromkeys(e.path for e in train))
        random.Random(seed).shuffle(files)
        held = set(files[: max(1, round(len(files) * validation_fraction))]) if len(files) > 1 else set()
        validation = [e for e in train if e.path in held]
        train = [e for e in train if e.path not in held]
        source = f"held out {validation_fraction:.0%} of train's files (seed {seed})"
    dataset = Dataset(root, kind, train, validation, source, bad)
    check(dataset, skip_bad)
    return dataset


def check(dataset: Dataset, skip_bad: bool) -> None:
    """Log (skip) or raise (refuse) the bad rows; refuse a dataset with nothing to train on."""
    if dataset.bad:
        listing = "\n".join(f"  {row}" for row in dataset.bad[:50])
        more = f"\n  ... and {len(dataset.bad) - 50} more" if len(dataset.bad) > 50 else ""
        if not skip_bad:
            raise DataError(
                f"{len(dataset.bad)} bad rows (use skip_bad / --skip-bad to train without them):\n{listing}{more}"
            )
        log.warning("skipping %d bad rows:\n%s%s", len(dataset.bad), listing, more)
    if not dataset.train:
        raise DataError(f"no usable training rows in {dataset.root}")
    if not dataset.validation:
        raise DataError(f"no usable validation rows in {dataset.root} (add a validation/ folder or more rows)")


def decode_all(
    dataset: Dataset,
    prepare: Callable[[Path], torch.Tensor],
    use: Callable[[Example, torch.Tensor], None],
    skip_bad: bool,
) -> None:
    """Decode every file with the inference media layer before training starts and pass it to
    `use`, so that a file that cannot be decoded is found (and skipped or refused) before the
    first epoch, not in the middle of one."""
    unreadable = []
    for split in (dataset.train, dataset.validation):
        kept = []
        for example in split:
            try:
                tensor = prepare(example.path)
            except MediaError as exc:
                unreadable.append(BadRow(example.where, f"unreadable file {example.path.name}: {exc}"))
                continue
            kept.append(example)
            use(example, tensor)
        split[:] = kept
    if unreadable:
        dataset.bad += unreadable
        check(dataset, skip_bad)

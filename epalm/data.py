"""Training data, read with the `datasets` library: a local folder in the `imagefolder` / `audiofolder` /
`videofolder` convention, or a dataset on the Hub (or a local folder laid out as one).

    DATA/metadata.jsonl              {"file_name": "a.jpg", "text": "a red square"}
    DATA/a.jpg ...                   (or metadata.csv / metadata.parquet; QA rows have "question" and "answer")
    DATA/train/metadata.jsonl, DATA/validation/metadata.jsonl   (optional splits)

Splits are found by `datasets`' own patterns (train / validation, valid, val, dev / test, ...) and
each metadata file is parsed by its `json`, `csv` or `parquet` builder. `file_name` (or the column
`media_column` names) is relative to its metadata file and must stay inside the data folder: an
absolute path, a `../` or a symlink that leads out is refused. The folder builders themselves are not
used for local folders: `audiofolder` needs torchcodec only to store a file's path, their guard
stops the whole load at the first escaping `file_name` without saying which row it was, and they
do not look at symlinks. A Hub dataset (`user/name`) or a local folder without metadata files is
loaded with `datasets.load_dataset`; its media column (an Image, Audio or Video feature) is read
undecoded, as the file's bytes, so that eP-ALM sees each input exactly as the inference path
prepares it (`epalm.image/video/audio`). With no validation or test split, a seeded fraction of
the training files is held out (all of their rows; at most `MAX_HELD_OUT` files: validating
decodes each of them, several times a run). Every bad row (missing file, empty text, a
file that cannot be decoded) is reported with where it is, then skipped or refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .media import MediaError

log = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
_BUILDERS = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_MEDIA_FEATURES = ("Image", "Audio", "Video")
LISTED = 50  # bad rows listed by name; the rest are counted
MAX_HELD_OUT = 500  # files; enough to tell epochs apart (a 2% standard error on an accuracy)


class DataError(UserError, ValueError):
    """The training data cannot be used as it is; the message says what to fix."""


@dataclass(frozen=True)
class Columns:
    """Which columns hold what. `media` None: `file_name` in a folder, the Image/Audio/Video column of a dataset."""

    media: str | None = None
    text: str = "text"
    question: str = "question"
    answer: str = "answer"


@dataclass(frozen=True)
class Embedded:
    """A media file stored in a dataset row (its bytes), read when needed."""

    rows: Any = field(compare=False, repr=False)  # the `datasets.Dataset`, its media column undecoded
    column: str
    index: int
    digest: str  # of the bytes: rows of the same file share its features
    name: str  # the file name the dataset records, for messages

    def read(self) -> bytes:
        return self.rows[self.index][self.column]["bytes"]


@dataclass(frozen=True)
class Example:
    """One training row: a media file (a path, or bytes in a dataset) and its target text."""

    media: Path | Embedded
    answer: str  # the caption, or the answer to `question`
    question: str | None = None
    where: str = ""  # "train/metadata.jsonl row 12", for messages

    @property
    def key(self) -> str:
        """The same for every row of one file: its features are computed once."""
        return str(self.media) if isinstance(self.media, Path) else self.media.digest

    @property
    def name(self) -> str:
        return self.media.name

    def source(self) -> Path | bytes:
        """What the media layer opens."""
        return self.media if isinstance(self.media, Path) else self.media.read()


@dataclass(frozen=True)
class BadRow:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Dataset:
    """The usable rows of each split and every row that was not usable."""

    source: str  # the folder, or the dataset's name
    kind: str  # "caption" or "qa"
    train: list[Example]
    validation: list[Example]
    validation_source: str  # the split, or how many files were held out of the training split
    bad: list[BadRow] = field(default_factory=list)
    reported: int = 0  # bad rows already reported (`check`)
    cut: int = 0  # texts cut to the LM's positions (set by the trainer)
    keep: Any = field(default=None, repr=False)  # what must live as long as the rows (a dataset's cache folder)

    def summary(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "train": len(self.train),
            "validation": len(self.validation),
            "validation_source": self.validation_source,
            "skipped_rows": len(self.bad),
            "cut_texts": self.cut,
        }


def load_data(
    source: str | Path,
    kind: str,
    split: str | None = None,
    columns: Columns = Columns(),
    validation_fraction: float = 0.1,
    seed: int = 42,
    skip_bad: bool = True,
) -> Dataset:
    """Read training data: a local folder or a Hub dataset id (module docstring). `kind` is the base
    task's, "caption" or "qa"; `split` the training split (default: train). With `skip_bad=False`
    any bad row is an error naming every bad row."""
    path = Path(source).expanduser()
    cache = None  # a local source's arrow files, in a folder that lives as long as the rows
    if path.is_dir():
        cache, name = tempfile.TemporaryDirectory(prefix="epalm-data-"), str(path.resolve())
        if _metadata_files(path):
            splits = _folder_splits(path.resolve(), cache.name)
        else:
            failure = (
                f"{name} has no metadata.jsonl, metadata.csv or metadata.parquet (imagefolder convention) "
                "and cannot be loaded as a dataset"
            )
            splits = _dataset_splits(name, cache.name, failure)
    elif path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise DataError(f"training data not found: {source} is neither a folder nor a Hub dataset id (user/name)")
    else:
        name = str(source)
        splits = _dataset_splits(name, None, f"cannot load the dataset {name} (nor is it a local folder)")
    train_split = split or "train"
    if train_split not in splits:
        raise DataError(f"{name} has no split {train_split!r}; its splits: {', '.join(splits)} (choose with --split)")
    validation_split = next((s for s in ("validation", "test") if s in splits and s != train_split), None)
    if validation_split is None and not 0 < validation_fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1, got {validation_fraction}")
    bad: list[BadRow] = []
    train = _examples(splits[train_split], kind, columns, bad)
    if validation_split is not None:
        validation = _examples(splits[validation_split], kind, columns, bad)
        held = validation_split
    else:
        train, validation = _hold_out(train, validation_fraction, seed)
        files = len({e.key for e in validation})
        share = f"{validation_fraction:.0%}, at most {MAX_HELD_OUT}; seed {seed}"
        held = f"{files} files held out of the training split ({share})"
    dataset = Dataset(name, kind, train, validation, held, bad, keep=cache)
    check(dataset, skip_bad)
    return dataset


# -- local folders ---------------------------------------------------------------------------------


def _metadata_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("metadata.*") if p.name in METADATA_FILES and p.is_file()]


@dataclass
class _Rows:
    """The rows of one split: from metadata files of a folder, or from a loaded dataset."""

    rows: Iterable[tuple[str, dict, Path | int]]  # (where, row, its metadata file's folder or its index)
    root: Path | None = None  # a folder: what media paths must stay inside
    dataset: Any = None  # a loaded dataset: where embedded media are read from
    features: dict = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)


def _folder_splits(root: Path, cache: str) -> dict[str, _Rows]:
    """Each split's metadata rows, found and parsed by `datasets` (module docstring)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    patterns = get_data_patterns(str(root))
    files = DataFilesDict.from_patterns(patterns, base_path=str(root))
    splits = {}
    for split, found in files.items():
        metadata = sorted(Path(f) for f in found if Path(f).name in METADATA_FILES)
        if not metadata:
            continue
        if len({m.suffix for m in metadata}) > 1:
            raise DataError(f"the {split} split of {root} mixes metadata formats: {', '.join(map(str, metadata))}")
        tables = [(m, _read_metadata(m, cache)) for m in metadata]
        rows = [
            (f"{m.relative_to(root)} row {i + 1}", row, m.parent) for m, table in tables for i, row in enumerate(table)
        ]
        names = list(dict.fromkeys(name for _, table in tables for name in table.column_names))
        splits[str(split)] = _Rows(rows, root=root, columns=names)
    if not splits:
        raise DataError(f"no metadata.jsonl, metadata.csv or metadata.parquet under {root}")
    return splits


def _read_metadata(metadata: Path, cache: str) -> Any:
    """One metadata file, parsed by the `datasets` builder for its format."""
    import datasets

    builder = _BUILDERS[metadata.suffix]
    if builder != "parquet":  # text: said plainly when it is not UTF-8 (a byte-order mark is fine)
        try:
            metadata.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            byte = exc.object[exc.start : exc.start + 1].hex()
            raise DataError(
                f"cannot read {metadata}: it is not UTF-8 text (byte {byte} at position {exc.start}); "
                "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
            ) from exc
    options = {"na_filter": False} if builder == "csv" else {}  # a caption "None" or "NA" stays text
    try:
        with _quiet():
            return datasets.load_dataset(
                builder, data_files=str(metadata), split="train", cache_dir=cache, keep_in_memory=True, **options
            )
    except Exception as exc:  # datasets wraps the parser's error; the cause says what is wrong
        raise DataError(f"cannot read {metadata}: {_cause(exc)}") from exc


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars and no log lines from `datasets` while it reads (its errors come back as ours)."""
    import datasets

    level, bars_off = datasets.logging.get_verbosity(), datasets.are_progress_bars_disabled()
    datasets.logging.set_verbosity(logging.CRITICAL + 1)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if not bars_off:
            datasets.enable_progress_bars()


def _innermost(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _cause(exc: BaseException) -> str:
    """The first line of the error `datasets` wrapped (its own message says only that something failed)."""
    inner = _innermost(exc)
    return f"{type(inner).__name__}: {inner}".split("\n")[0]


def _file(root: Path, folder: Path, name: str) -> Path | str:
    """The file `name` of a metadata file in `folder`, or why it cannot be used."""
    if os.path.isabs(name) or "://" in name:
        return f"file_name {name!r} is absolute or a URL: refused (it must be a path relative to its metadata file)"
    path = (folder / name).resolve()
    if not path.is_relative_to(root):
        return f"file_name {name!r} leads outside the data folder {root}: refused"
    if not path.is_file():
        return f"file not found: {name}"
    return path


# -- datasets (the Hub, or a local folder laid out as one) -----------------------------------------


def _dataset_splits(name: str, cache: str | None, failure: str = "") -> dict[str, _Rows]:
    """The splits of a dataset `datasets` loads (`failure`: what the message says when it cannot)."""
    import datasets

    try:
        with _quiet():
            loaded = datasets.load_dataset(name, cache_dir=cache, keep_in_memory=cache is not None)
            loaded = {str(split): _undecoded(rows) for split, rows in loaded.items()}
    except Exception as exc:
        if isinstance(_innermost(exc), ImportError):  # an audiofolder repo: datasets needs torchcodec to store paths
            raise DataError(
                f"cannot read {name} with datasets ({_cause(exc)}); download it (`hf download --repo-type dataset "
                f"{name} --local-dir DIR`) and train on the folder"
            ) from exc
        raise DataError(f"{failure or f'cannot load the dataset {name}'}: {_cause(exc)}") from exc
    return {split: _dataset_rows(f"{name} [{split}] row", rows) for split, rows in loaded.items()}


def _undecoded(rows: Any) -> Any:
    """The dataset with its image, audio and video columns as the files' bytes, not decoded by datasets."""
    for column, feature in rows.features.items():
        if type(feature).__name__ in _MEDIA_FEATURES:
            rows = rows.cast_column(column, type(feature)(decode=False))
    return rows


def _dataset_rows(where: str, rows: Any) -> _Rows:
    return _Rows(
        ((f"{where} {i + 1}", row, i) for i, row in enumerate(rows)),
        dataset=rows,
        features=dict(rows.features),
        columns=list(rows.column_names),
    )


def _media_column(split: _Rows, columns: Columns) -> str:
    if columns.media is not None:
        if columns.media not in split.columns:
            raise DataError(f"no column {columns.media!r} (--media-column); the columns: {', '.join(split.columns)}")
        return columns.media
    if split.root is not None:
        named = [c for c in split.columns if c == "file_name" or c.endswith("_file_name")]
        if not named:
            raise DataError(f"the metadata has no file_name column; its columns: {', '.join(split.columns)}")
        return named[0]
    media = [c for c, f in split.features.items() if type(f).__name__ in _MEDIA_FEATURES]
    if not media:
        raise DataError(
            f"no image, audio or video column; the columns: {', '.join(split.columns)} (name one with --media-column)"
        )
    return media[0]


def _examples(split: _Rows, kind: str, columns: Columns, bad: list[BadRow]) -> list[Example]:
    """The usable rows of one split; the others are added to `bad` with their reason."""
    media = _media_column(split, columns)
    wanted = [columns.question, columns.answer] if kind == "qa" else [columns.text]
    missing = [c for c in wanted if c not in split.columns]
    if missing:
        flags = {
            columns.text: "--text-column",
            columns.question: "--question-column",
            columns.answer: "--answer-column",
        }
        others = "question and answer" if {columns.question, columns.answer} <= set(split.columns) else ""
        hint = f"; it has {others} columns: is the base task a QA task?" if kind == "caption" and others else ""
        raise DataError(
            f"the data has no {' or '.join(repr(c) for c in missing)} column for a {kind} task "
            f"(name yours with {' / '.join(flags[c] for c in missing)}); its columns: {', '.join(split.columns)}{hint}"
        )
    examples = []
    for where, row, origin in split.rows:
        found = _media(split, row, media, origin)
        if isinstance(found, str):
            bad.append(BadRow(where, found))
            continue
        if kind == "qa":
            question, answer = _text(split, row, columns.question), _text(split, row, columns.answer)
            if not question or not answer:
                bad.append(BadRow(where, "empty question or answer"))
                continue
            examples.append(Example(found, answer, question, where))
        else:
            text = _text(split, row, columns.text).replace("</s>", "").strip()
            if not text:
                bad.append(BadRow(where, "empty text"))
                continue
            examples.append(Example(found, text, None, where))
    return examples


def _media(split: _Rows, row: dict, column: str, origin: Path | int) -> Path | Embedded | str:
    """The row's media file, or why there is none."""
    value = row.get(column)
    if isinstance(origin, Path):  # a metadata file's folder
        if not isinstance(value, str) or not value.strip():
            return f"no {column}"
        return _file(split.root, origin, value.strip())
    if not isinstance(value, dict) or not (value.get("bytes") or value.get("path")):
        return f"no {column}"
    if value.get("bytes"):
        digest = hashlib.sha1(value["bytes"]).hexdigest()
        return Embedded(split.dataset, column, origin, digest, value.get("path") or f"row {origin + 1}")
    path = Path(value["path"])  # a file datasets downloaded into its cache
    return path if path.is_file() else f"file not found: {value['path']}"


def _text(split: _Rows, row: dict, column: str) -> str:
    value = row.get(column)
    if isinstance(value, list):  # several references: train on the first, as one caption per row
        value = value[0] if value else ""
    feature = split.features.get(column)
    if isinstance(value, int) and hasattr(feature, "int2str"):  # a ClassLabel: its name
        value = feature.int2str(value)
    return str(value).strip() if value is not None else ""


def held_out_count(files: int, fraction: float) -> int:
    """How many of `files` are held out for validation (at least one, at most `MAX_HELD_OUT`)."""
    return min(max(1, round(files * fraction)), MAX_HELD_OUT)


def _hold_out(train: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Whole files are held out: a file's other captions or questions in train would leak its answers."""
    files = list(dict.fromkeys(e.key for e in train))
    random.Random(seed).shuffle(files)
    held = set(files[: held_out_count(len(files), fraction)]) if len(files) > 1 else set()
    return [e for e in train if e.key not in held], [e for e in train if e.key in held]


def check(dataset: Dataset, skip_bad: bool) -> None:
    """Log (skip) or raise (refuse) the bad rows not reported yet; refuse a dataset with nothing to train on."""
    new = dataset.bad[dataset.reported :]
    if new:
        listing = "\n".join(f"  {row}" for row in new[:LISTED])
        more = f"\n  ... and {len(new) - LISTED} more" if len(new) > LISTED else ""
        noun = "bad row" if len(new) == 1 else "bad rows"
        if not skip_bad:
            raise DataError(f"{len(new)} {noun} (without --refuse-bad they are skipped):\n{listing}{more}")
        again = " more" if dataset.reported else ""
        log.warning("skipping %d%s %s:\n%s%s", len(new), again, noun, listing, more)
        dataset.reported = len(dataset.bad)
    if not dataset.train:
        raise DataError(f"no usable training rows in {dataset.source}")
    if not dataset.validation:
        raise DataError(f"no usable validation rows in {dataset.source} (add a validation split or more rows)")


def decode_all(
    dataset: Dataset,
    prepare: Callable[[Path | bytes], torch.Tensor],
    use: Callable[[Example, torch.Tensor], None],
    skip_bad: bool,
) -> None:
    """Decode every file once with the inference media layer before training starts and pass it to
    `use`, so that a file that cannot be decoded is found (and skipped or refused) before the first
    epoch, not in the middle of one."""
    unreadable: list[BadRow] = []
    done: set[str] = set()
    failed: dict[str, str] = {}  # file -> why it cannot be read: its other rows are bad for the same reason
    for split in (dataset.train, dataset.validation):
        kept = []
        for example in split:
            if example.key not in done and example.key not in failed:
                try:
                    use(example, prepare(example.source()))
                    done.add(example.key)
                except MediaError as exc:
                    failed[example.key] = f"unreadable file {example.name}: {exc}"
            if example.key in failed:
                unreadable.append(BadRow(example.where, failed[example.key]))
            else:
                kept.append(example)
        split[:] = kept
    if unreadable:
        dataset.bad += unreadable
        check(dataset, skip_bad)

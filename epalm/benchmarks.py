"""The benchmarks' own annotation files, read into items to predict, and how each is scored.

Recognised by their content (the file's name does not matter):

- COCO captions: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`
  (captions_val2014.json, and the Karpathy-split ground truths in that format);
- Karpathy's split file (dataset_coco.json): `{"images": [{"split", "filepath", "filename", "cocoid",
  "sentences": [{"raw"}]}]}`, one split (`split`, default test) read;
- a list of `{"image" | "video" | "audio": file, "caption": text or list}` (the Karpathy test files of
  BLIP/ALBEF, eP-ALM's MSR-VTT and AudioCaps annotation files);
- VQAv2: the annotations file (`{"annotations": [{"question_id", "answers": [ten]}]}`) with its
  questions file (`--questions`); images `COCO_<data_subtype>_<image_id:012d>.jpg` unless a pattern says;
- GQA: its questions JSON (`{question id: {"imageId", "question", "answer", ...}}`), balanced
  questions only where the file marks them (`isBalanced`), as GQA's eval.py scores;
- MSR-VTT: `{"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption"}]}` (split test by default);
- MSRVTT-QA / MSVD-QA as published: `[{"id", "video_id", "question", "answer"}]`, videos
  `video<video_id>.mp4`, or for MSVD, with its youtube_mapping.txt beside the file, `<YouTube name>.avi`;
- eP-ALM's QA files: `[{"video" or "img_id", "question_id", "sent" or "question", "label": {answer: score}}]`;
- CSV with a caption column (`caption` or `sentence`) and an id column: AudioCaps
  (`audiocap_id,youtube_id,start_time,caption`, one item per `youtube_id`, `<youtube_id>.wav`), MSR-VTT.

`--image-pattern` names the media file of each item from its fields, e.g.
`"COCO_val2014_{image_id:012d}.jpg"` or `"{youtube_id}_{start_time}.wav"`; the error for a bad
pattern lists the fields.
"""

from __future__ import annotations

import csv
import json
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics
from .errors import UserError

Key = int | str


class BenchmarkError(UserError, ValueError):
    """An annotation file that cannot be read as a benchmark; the message says what to fix."""


@dataclass(frozen=True)
class Item:
    """One thing to predict: a caption for a medium, or the answer to a question about it."""

    key: Key  # the id the results file gives it (image_id, question_id, questionId)
    media: Path
    question: str | None = None
    references: tuple[str, ...] = ()  # the reference captions, or the human answers
    weights: tuple[float, ...] = ()  # per reference answer (eP-ALM's labels); 1 when empty
    answer_type: str = ""  # VQAv2's answer type, GQA's binary / open
    question_type: str = ""


@dataclass
class Benchmark:
    """The items of one annotation file, and how its results are written and scored."""

    name: str  # what the file is, for people: "COCO captions", "VQAv2"...
    kind: str  # "caption" or "qa", as a task's kind
    modality: str  # "image", "video" or "audio"
    scoring: str  # "caption", "vqa", "exact" (GQA and video QA: exact string, and eP-ALM's normalised)
    items: list[Item]
    id_field: str = "image_id"  # the official results format: [{id_field: key, text_field: text}]
    text_field: str = "caption"
    notes: list[str] = field(default_factory=list)

    def results(self, predictions: Mapping[Key, str]) -> list[dict[str, Any]]:
        """The official results format, in the file's order."""
        return [{self.id_field: i.key, self.text_field: predictions[i.key]} for i in self.items if i.key in predictions]

    def score(self, predictions: Mapping[Key, str]) -> tuple[dict[str, float], list[str]]:
        """Metrics in percent over every item (an item without a prediction scores as a wrong
        answer), and notes on how they were computed."""
        texts = {item.key: predictions.get(item.key, "") for item in self.items}
        if self.scoring == "caption":
            result = metrics.coco_caption_scores(texts, {i.key: list(i.references) for i in self.items})
            return {k: 100 * v for k, v in result.scores.items()}, [f"captions tokenized by the {result.tokenizer}"]
        if self.scoring == "vqa":
            scores = metrics.vqa_scores(
                texts,
                {i.key: list(i.references) for i in self.items},
                {i.key: i.answer_type for i in self.items},
                {i.key: i.question_type for i in self.items},
            )
            by_type = {f"VQA accuracy ({name})": value for name, value in sorted(scores.per_answer_type.items())}
            return {"VQA accuracy": scores.overall, **by_type}, ["the official VQA evaluation's rule"]
        guesses = [texts[i.key] for i in self.items]
        result = {"accuracy": 100 * metrics.exact_accuracy(guesses, [i.references[0] for i in self.items])}
        result["accuracy (normalised)"] = 100 * metrics.normalised_accuracy(guesses, [_labels(i) for i in self.items])
        for group in sorted({i.answer_type for i in self.items} - {""}):
            chosen = [i for i in self.items if i.answer_type == group]
            exact = metrics.exact_accuracy([texts[i.key] for i in chosen], [i.references[0] for i in chosen])
            result[f"accuracy ({group})"] = 100 * exact
        return result, [
            "accuracy: exact string match (GQA's eval.py rule); accuracy (normalised): after the VQA "
            "normalisation, eP-ALM's rule, the one its paper reports"
        ]


def _labels(item: Item) -> dict[str, float]:
    return dict(zip(item.references, item.weights or (1.0,) * len(item.references)))


@dataclass(frozen=True)
class _Row:
    """A file's row before its media path is known: its fields (for the pattern) and default file."""

    key: Key
    fields: dict[str, Any]
    default: str | None  # the media file when no pattern is given (None: the file names none)
    question: str | None = None
    references: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    answer_type: str = ""
    question_type: str = ""


@dataclass
class _Read:
    name: str
    kind: str
    modality: str
    scoring: str
    rows: list[_Row]
    id_field: str = "image_id"
    text_field: str = "caption"
    notes: list[str] = field(default_factory=list)


def read_benchmark(
    annotations: str | Path,
    media: str | Path,
    questions: str | Path | None = None,
    image_pattern: str | None = None,
    split: str | None = None,
) -> Benchmark:
    """The benchmark in `annotations` (with VQAv2's `questions`), its media under `media`."""
    path = Path(annotations).expanduser()
    data = _load(path)
    read = _recognise(data, path, _load(Path(questions).expanduser()) if questions else None, split)
    if questions and read.scoring != "vqa":
        raise BenchmarkError(f"--questions is for VQAv2's questions file; {path.name} holds {read.name}")
    if not read.rows:
        raise BenchmarkError(f"{path} holds no {read.name} items" + (f" in split {split!r}" if split else ""))
    root = Path(media).expanduser()
    items = [
        Item(
            row.key,
            root / _media_name(row, image_pattern, read.name),
            row.question,
            row.references,
            row.weights,
            row.answer_type,
            row.question_type,
        )
        for row in read.rows
    ]
    return Benchmark(
        read.name, read.kind, read.modality, read.scoring, items, read.id_field, read.text_field, read.notes
    )


def _load(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise BenchmarkError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if path.suffix.lower() in (".csv", ".tsv"):
        return list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path} is neither JSON nor CSV: {exc}") from exc


def _media_name(row: _Row, pattern: str | None, name: str) -> str:
    if pattern is None:
        if row.default is None:
            raise BenchmarkError(
                f"this {name} file does not name the media files: give --image-pattern, built from the fields "
                f"{_field_list(row)}, e.g. 'COCO_val2014_{{image_id:012d}}.jpg'"
            )
        return row.default
    try:
        return string.Formatter().vformat(pattern, (), row.fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise BenchmarkError(
            f"--image-pattern {pattern!r} does not fit this file ({exc}); fields: {_field_list(row)}"
        ) from None


def _field_list(row: _Row) -> str:
    return ", ".join("{" + name + "}" for name in row.fields)


def _recognise(data: Any, path: Path, questions: Any, split: str | None) -> _Read:
    """The reader for `data`, by its shape."""
    if isinstance(data, dict):
        first = lambda key: (data.get(key) or [{}])[0] if isinstance(data.get(key), list) else {}  # noqa: E731
        if "answers" in first("annotations") or "questions" in data:
            return _vqa(data, questions, path)
        if "caption" in first("annotations"):
            return _coco(data)
        if "sentences" in first("images"):
            return _karpathy(data, split or "test")
        if "sentences" in data and "videos" in data:
            return _msrvtt(data, split or "test")
        values = list(data.values())[:1]
        if values and isinstance(values[0], dict) and {"imageId", "question", "answer"} <= values[0].keys():
            return _gqa(data)
    if isinstance(data, list) and data and isinstance(data[0], dict):
        keys = data[0].keys()
        if {"video_id", "question", "answer"} <= keys:
            return _published_video_qa(data, path)
        if "label" in keys and ({"video", "img_id"} & keys):
            return _labelled_qa(data)
        caption_column = next((c for c in ("caption", "sentence", "captions") if c in keys), None)
        if caption_column and (keys & {"image", "video", "audio"}):
            return _caption_list(data, caption_column)
        if caption_column:
            return _caption_table(data, caption_column)
    raise BenchmarkError(f"{path} is not an annotation file this command reads (see `epalm eval --help`)")


def _grouped(pairs: list[tuple[Key, str]]) -> dict[Key, list[str]]:
    grouped: dict[Key, list[str]] = {}
    for key, caption in pairs:
        grouped.setdefault(key, []).append(caption)
    return grouped


def _coco(data: dict) -> _Read:
    captions = _grouped([(a["image_id"], a["caption"]) for a in data["annotations"]])
    names = {image["id"]: image.get("file_name") for image in data.get("images", [])}
    rows = [
        _Row(key, {"image_id": key, "file_name": names.get(key)}, names.get(key), references=tuple(refs))
        for key, refs in captions.items()
    ]
    return _Read("COCO captions", "caption", "image", "caption", rows)


def _karpathy(data: dict, split: str) -> _Read:
    wanted = {"train": {"train", "restval"}}.get(split, {split})
    rows = []
    for image in data["images"]:
        if image.get("split") not in wanted:
            continue
        key = image.get("cocoid", image.get("imgid"))
        name = "/".join(p for p in (image.get("filepath"), image["filename"]) if p)
        fields = {"image_id": key, "filepath": image.get("filepath", ""), "filename": image["filename"]}
        rows.append(_Row(key, fields, name, references=tuple(s["raw"] for s in image["sentences"])))
    return _Read(f"Karpathy split ({split})", "caption", "image", "caption", rows)


def _caption_list(data: list, column: str) -> _Read:
    modality = next(m for m in ("image", "video", "audio") if m in data[0])
    rows = []
    for entry in data:
        name = entry[modality]
        key = _file_key(name) if modality == "image" else Path(name).stem
        refs = entry[column] if isinstance(entry[column], list) else [entry[column]]
        rows.append(_Row(key, {"image_id": key, "file": name}, name, references=tuple(refs)))
    merged = _merge_rows(rows)
    title = {"image": "image captions", "video": "video captions", "audio": "audio captions"}[modality]
    return _Read(title, "caption", modality, "caption", merged)


def _file_key(name: str) -> Key:
    """COCO's id from a file name (BLIP's rule: the digits after the last '_'), else the name's stem."""
    stem = Path(name).stem
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else stem


def _merge_rows(rows: list[_Row]) -> list[_Row]:
    """One row per key, the references of every row with that key together, in first-seen order."""
    merged: dict[Key, _Row] = {}
    for row in rows:
        if row.key in merged:
            old = merged[row.key]
            merged[row.key] = _Row(row.key, old.fields, old.default, references=old.references + row.references)
        else:
            merged[row.key] = row
    return list(merged.values())


def _caption_table(data: list, column: str) -> _Read:
    keys = data[0].keys()
    id_column = next((c for c in ("youtube_id", "video_id", "audio", "file_name", "image_id") if c in keys), None)
    if id_column is None:
        raise BenchmarkError(
            f"a caption table needs an id column (youtube_id, video_id, file_name); it has {list(keys)}"
        )
    audio = id_column == "youtube_id"
    rows = []
    for entry in data:
        key = entry[id_column]
        default = f"{key}.wav" if audio else (f"{key}.mp4" if id_column == "video_id" else key)
        rows.append(_Row(key, dict(entry), default, references=(entry[column],)))
    name = "AudioCaps captions" if audio else "captions (CSV)"
    modality = "audio" if audio else "video" if id_column == "video_id" else "image"
    return _Read(name, "caption", modality, "caption", _merge_rows(rows))


def _msrvtt(data: dict, split: str) -> _Read:
    videos = [v["video_id"] for v in data["videos"] if v.get("split", split) == split]
    captions = _grouped([(s["video_id"], s["caption"]) for s in data["sentences"]])
    rows = [_Row(v, {"video_id": v}, f"{v}.mp4", references=tuple(captions[v])) for v in videos if captions.get(v)]
    return _Read(f"MSR-VTT captions ({split})", "caption", "video", "caption", rows)


def _vqa(annotations: dict, questions: Any, path: Path) -> _Read:
    if "questions" in annotations:
        raise BenchmarkError(
            f"{path.name} is VQAv2's questions file: give the annotations file (ten answers per question) as "
            "--annotations and this one as --questions"
        )
    if not isinstance(questions, dict) or "questions" not in questions:
        raise BenchmarkError(
            "VQAv2's annotations need its questions file too: --questions v2_OpenEnded_..._questions.json"
        )
    subtype = questions.get("data_subtype")
    answers = {a["question_id"]: a for a in annotations["annotations"]}
    rows = []
    for question in questions["questions"]:
        ann = answers.get(question["question_id"])
        if ann is None:
            continue
        image = question["image_id"]
        fields = {"image_id": image, "question_id": question["question_id"], "data_subtype": subtype}
        rows.append(
            _Row(
                question["question_id"],
                fields,
                f"COCO_{subtype}_{image:012d}.jpg" if subtype else None,
                question=question["question"],
                references=tuple(a["answer"] for a in ann["answers"]),
                answer_type=ann.get("answer_type", ""),
                question_type=ann.get("question_type", ""),
            )
        )
    return _Read("VQAv2", "qa", "image", "vqa", rows, "question_id", "answer")


def _gqa(data: dict) -> _Read:
    rows = []
    balanced_only = any("isBalanced" in q for q in data.values())
    for key, question in data.items():
        if balanced_only and not question.get("isBalanced"):
            continue
        structural = question.get("types", {}).get("structural")
        group = "" if structural is None else "open" if structural == "query" else "binary"
        fields = {"image_id": question["imageId"], "question_id": key}
        rows.append(
            _Row(
                key,
                fields,
                f"{question['imageId']}.jpg",
                question=question["question"],
                references=(question["answer"],),
                answer_type=group,
            )
        )
    notes = ["balanced questions only (isBalanced), as GQA's eval.py scores"] if balanced_only else []
    return _Read("GQA", "qa", "image", "exact", rows, "questionId", "prediction", notes)


def _published_video_qa(data: list, path: Path) -> _Read:
    mapping = path.parent / "youtube_mapping.txt"
    names = _youtube_names(mapping) if mapping.is_file() else None
    rows = []
    for entry in data:
        video = entry["video_id"]
        fields = {"video_id": video, "question_id": entry["id"]}
        if names is not None:
            fields["video_name"] = names.get(f"vid{video}")
        default = f"{fields['video_name']}.avi" if names is not None else f"video{video}.mp4"
        rows.append(_Row(entry["id"], fields, default, question=entry["question"], references=(entry["answer"],)))
    name = "MSVD-QA" if names is not None else "MSRVTT-QA"
    return _Read(name, "qa", "video", "exact", rows, "question_id", "answer")


def _youtube_names(mapping: Path) -> dict[str, str]:
    """MSVD's youtube_mapping.txt: `<YouTube clip name> vid<N>` per line."""
    names = {}
    for line in mapping.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            names[parts[1]] = parts[0]
    return names


def _labelled_qa(data: list) -> _Read:
    video = "video" in data[0]
    rows = []
    for entry in data:
        label = entry["label"] or {}
        ranked = sorted(label.items(), key=lambda pair: -pair[1])  # the best answer first (exact accuracy's)
        media = entry["video"] if video else f"{entry['img_id']}.jpg"
        fields = {"image_id": entry.get("img_id", Path(media).stem), "question_id": entry["question_id"]}
        rows.append(
            _Row(
                entry["question_id"],
                fields,
                media,
                question=entry.get("sent", entry.get("question")),
                references=tuple(a for a, _ in ranked) or ("",),
                weights=tuple(float(w) for _, w in ranked) or (0.0,),
            )
        )
    return _Read("eP-ALM QA file", "qa", "video" if video else "image", "exact", rows, "question_id", "answer")

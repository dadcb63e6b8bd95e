"""The task registry: what each released adapter needs, read from `checkpoints/tasks.yaml`.

A task names its LM, its encoder, the preprocessing, the injection and prompt settings, the text
format, its decoding settings (the paper's, plus the fewest new tokens a long question leaves room
for), where its adapter lives on the Hub and the recipe that adapter was trained with. Users add tasks or
point one at their own adapter by editing the YAML (or passing another file); no code changes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .audio import AudioTransform, prepare_audio
from .decoding import DecodingOptions
from .errors import bounded
from .image import ImageTransform, prepare_image
from .media import MediaLimits
from .model import InjectionConfig
from .refs import (  # where a task's files are, readable without torch
    ADAPTER_CONFIG,
    KINDS,
    MODALITIES,
    TASK_KEYS,
    AdapterSource,
    EncoderRef,
    ModelRef,
    RegistryError,
    check_value,
    config_data,
    read_entries,
    registry_path,
    settings,
    task_refs,
    with_adapter_settings,
)
from .video import VideoTransform, prepare_video

KIND_WORDS = {"caption": "captioning", "qa": "question answering"}
MEDIA_NAMES = {"image": "an image", "video": "a video", "audio": "an audio clip"}
Transform = ImageTransform | VideoTransform | AudioTransform
_TRANSFORMS = {"image": ImageTransform, "video": VideoTransform, "audio": AudioTransform}
_PREPARE = {"image": prepare_image, "video": prepare_video, "audio": prepare_audio}


QUESTION = "{question}"  # where a prompt takes the question


@dataclass(frozen=True)
class TextFormat:
    """How the LM input is written. Captions start from BOS alone (`prompt: ""`); questions are
    `{question}?</a>` as in the original, whose questions already ended with "?" (so the model saw
    "...??</a>"): with `question_mark`, a question typed without "?" gets one first.
    `answer_token` is the special token the QA training scripts added to the tokenizer (`</a>`)."""

    prompt: str = ""
    answer_token: str | None = None
    question_mark: bool = False

    def __post_init__(self) -> None:
        rest = self.prompt.replace(QUESTION, "", 1)
        if "{" in rest or "}" in rest:
            raise ValueError(f"prompt may hold {QUESTION} once and no other braces, not {self.prompt!r}")
        if self.answer_token and self.answer_token not in self.prompt:
            raise ValueError(f"answer_token {self.answer_token!r} does not occur in the prompt {self.prompt!r}")

    def render(self, question: str | None) -> str:
        """The prompt with the question in place of {question}, as plain text (never a format string)."""
        if QUESTION not in self.prompt:
            return self.prompt
        question = (question or "").strip()
        if self.question_mark and not question.endswith("?"):
            question += "?"
        return self.prompt.replace(QUESTION, question)

    def prompt_ids(self, tokenizer, question: str | None) -> list[int]:
        """The LM input at inference: BOS then the rendered prompt (the original tokenizer call)."""
        return [tokenizer.bos_token_id] + tokenizer(self.render(question), add_special_tokens=False).input_ids

    def training_ids(self, tokenizer, question: str | None, answer: str) -> list[int]:
        """What the original trained on: BOS, the prompt, the caption or answer, EOS
        (`caption</s>`, `question?</a>answer</s>`); it starts with `prompt_ids`."""
        text = self.render(question) + answer + tokenizer.eos_token
        return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids


@dataclass(frozen=True)
class PaperResult:
    """What the paper reports for a task (`epalm eval` prints it beside its own numbers): the
    benchmark and split, and each metric's value as the paper gives it (a number, or a text such as
    "45.0 (val) / 40.4 (test)" where it gives several)."""

    benchmark: str
    metrics: tuple[tuple[str, float | str], ...] = ()


@dataclass(frozen=True)
class TrainingRecipe:
    """The optimisation settings a task's released adapter was trained with (the registry's `training`;
    docs/original.md, "Training"): what `python -m epalm train --recipe paper` runs."""

    epochs: int
    batch_size: int
    lr: float
    prompt_lr: float
    warmup_lr: float
    min_lr: float

    def __post_init__(self) -> None:
        bounded("epochs", self.epochs, 1, 10_000)
        bounded("batch_size", self.batch_size, 1, 65_536)
        for name in ("lr", "prompt_lr", "warmup_lr", "min_lr"):
            bounded(name, getattr(self, name), 0, 1, whole=False)


@dataclass(frozen=True)
class Task:
    id: str
    title: str
    label: str  # short, for menus: "VQAv2", "COCO captions"
    modality: str
    kind: str
    lm: ModelRef
    encoder: EncoderRef
    preprocess: Transform
    injection: InjectionConfig
    text: TextFormat
    generation: DecodingOptions
    adapter: AdapterSource
    paper: PaperResult | None = None
    training: TrainingRecipe | None = None  # the released adapter's recipe; None for a task that states none

    @property
    def needs_question(self) -> bool:
        return self.kind == "qa"

    def prepare(self, media: Any, limits: MediaLimits, transform: Transform | None = None) -> Any:
        """The encoder's input for `media` (a tensor without the batch dimension), as this task's
        preprocessing makes it (`transform`: another, e.g. more video frames)."""
        return _PREPARE[self.modality](media, transform or self.preprocess, limits)

    @property
    def menu_label(self) -> str:
        """What a person picks the task by, e.g. "VQAv2 · OPT-2.7B + ViT-B/16"."""
        return f"{self.label} · {self.lm.display_name} + {self.encoder.display_name}"


def _build(task_id: str, entry: object, base_dir: Path, where: str = "") -> Task:
    """A task from its registry entry (or an adapter config), every value checked (`refs.settings`);
    a RegistryError names the task (or `where`) and the field."""
    try:
        if not isinstance(entry, dict):
            raise ValueError("must be a mapping")
        entry = with_adapter_settings(entry, base_dir)
        refs = task_refs(task_id, entry, base_dir)
        return Task(
            id=task_id,
            title=refs.title,
            label=refs.label,
            modality=refs.modality,
            kind=refs.kind,
            lm=refs.lm,
            encoder=refs.encoder,
            preprocess=_section(_TRANSFORMS[refs.modality], entry.get("preprocess"), "preprocess"),
            injection=_section(InjectionConfig, entry.get("injection"), "injection"),
            text=_section(TextFormat, entry.get("text"), "text"),
            generation=_section(DecodingOptions, entry.get("generation"), "generation"),
            adapter=refs.adapter,
            paper=_paper(entry.get("paper")),
            training=_section(TrainingRecipe, entry["training"], "training") if "training" in entry else None,
        )
    except (KeyError, TypeError, ValueError) as exc:  # RegistryError is a ValueError
        raise RegistryError(f"{where or f'task {task_id!r}'}: {exc}") from exc


def _section(cls: type, value: object, where: str) -> Any:
    """The dataclass `cls` built from `value`, every field checked; a bad value names its field."""
    checked = settings(cls, value, where)
    try:
        return cls(**checked)
    except ValueError as exc:  # a bound of the dataclass's own: its message starts with the field's name
        named = str(exc).split(" ", 1)[0] in checked
        raise ValueError(f"{where}.{exc}" if named else f"{where}: {exc}") from None


def _paper(entry: dict | None) -> PaperResult | None:
    """`paper: {benchmark: COCO Karpathy test, CIDEr: 97.22, ...}`: the benchmark, then metric: value."""
    if entry is None:
        return None
    values = {k: v for k, v in entry.items() if k != "benchmark"}
    return PaperResult(str(entry["benchmark"]), tuple((str(k), v) for k, v in values.items()))


def tasks_by_modality(tasks: Iterable[Task]) -> dict[str, dict[str, list[Task]]]:
    """modality -> kind -> tasks, modalities and kinds in their fixed order, tasks in registry order:
    what the app's tabs and menus show."""
    grouped: dict[str, dict[str, list[Task]]] = {}
    for task in tasks:
        grouped.setdefault(task.modality, {}).setdefault(task.kind, []).append(task)
    return {m: {k: grouped[m][k] for k in KINDS if k in grouped[m]} for m in MODALITIES if m in grouped}


def answer_tokens(tasks: Iterable[Task], lm: ModelRef) -> list[str]:
    """The special tokens the tokenizer of `lm` needs: the answer tokens of every task on that LM,
    so that one shared tokenizer reads every task's prompt as its training script did."""
    return sorted({task.text.answer_token for task in tasks if task.lm == lm and task.text.answer_token})


# The generation settings that belong to a task (stored with an adapter, so that it decodes as its task did);
# the token ids come from the tokenizer and the seed from the call.
TASK_GENERATION_KEYS = tuple(
    f.name for f in fields(DecodingOptions) if f.name not in ("eos_token_id", "pad_token_id", "seed")
)


@dataclass(frozen=True)
class AdapterConfig:
    """`adapter_config.json`: the settings of the task an adapter was trained or converted for (enough to
    rebuild that task) and, for one trained here, what it came from. The one writer and reader of the
    file; reading treats it as untrusted input (a stranger's Hub repo): every value is checked, and a
    bad one is refused naming its field."""

    task: Task
    base_task: str | None = None  # the registry task it was trained from
    tiny: bool = False  # trained on the tiny random test models: it runs only on them
    training: dict | None = None  # its training run: data, recipe, best score (epalm.training)

    def to_dict(self) -> dict:
        task = self.task
        data = {
            "task": task.id,
            "title": task.title,
            "label": task.label,
            "modality": task.modality,
            "kind": task.kind,
            "lm": asdict(task.lm),
            "encoder": {**asdict(task.encoder), "config": dict(task.encoder.config)},
            "preprocess": asdict(task.preprocess),
            "injection": asdict(task.injection),
            "text": asdict(task.text),
            "generation": {key: getattr(task.generation, key) for key in TASK_GENERATION_KEYS},
            "tiny": self.tiny,
        }
        if self.base_task is not None:
            data["base_task"] = self.base_task
        if self.training is not None:
            data["training"] = self.training
        return data

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / ADAPTER_CONFIG
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path, task_id: str, weights: AdapterSource | None = None) -> AdapterConfig:
        """The config in `folder`, its task named `task_id` with its weights in that folder or `weights`
        (a Hub repo's file, fetched when the adapter loads). RegistryError: missing, unreadable or bad."""
        folder = Path(folder).expanduser().resolve()
        data = config_data(folder)
        try:
            entry = {key: data[key] for key in TASK_KEYS if key in data}
            task = _build(task_id, {**entry, "adapter": {"filename": str(folder)}}, folder, where=ADAPTER_CONFIG)
            base_task = check_value(data.get("base_task"), str | None, "base_task")
            tiny = check_value(data.get("tiny", False), bool, "tiny")
            training = data.get("training")
            if training is not None and not isinstance(training, dict):
                raise ValueError("training must be a mapping")
        except ValueError as exc:
            raise RegistryError(str(exc) if isinstance(exc, RegistryError) else f"{ADAPTER_CONFIG}: {exc}") from exc
        return cls(task if weights is None else replace(task, adapter=weights), base_task, tiny, training)


def load_registry(path: str | Path | None = None) -> dict[str, Task]:
    """All tasks of a registry file (default: the project's `checkpoints/tasks.yaml`, or the
    file named by the EPALM_TASKS environment variable)."""
    return _load(registry_path(path))


@functools.lru_cache(maxsize=8)
def _load(path: Path) -> dict[str, Task]:
    return {task_id: _build(task_id, entry, path.parent) for task_id, entry in read_entries(path).items()}


def get_task(task_id: str, registry: dict[str, Task] | None = None) -> Task:
    tasks = registry if registry is not None else load_registry()
    if task_id not in tasks:
        raise KeyError(f"unknown task {task_id!r}; known tasks: {', '.join(tasks)}")
    return tasks[task_id]

"""The task registry: what each released adapter needs, read from `checkpoints/tasks.yaml`.

A task names its LM, its encoder, the preprocessing, the injection and prompt settings, the text
format, its decoding settings (the paper's, plus the fewest new tokens a long question leaves room
for), where its adapter lives on the Hub and the recipe that adapter was trained with. Users add tasks or
point one at their own adapter by editing the YAML (or passing another file); no code changes.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from .audio import AudioTransform
from .decoding import DecodingOptions
from .errors import UserError
from .image import ImageTransform
from .model import InjectionConfig
from .video import VideoTransform

# The repository's checkpoints/tasks.yaml (a checkout or an editable install); a wheel carries it as epalm/tasks.yaml
_CHECKOUT_REGISTRY = Path(__file__).resolve().parents[1] / "checkpoints" / "tasks.yaml"
DEFAULT_REGISTRY = _CHECKOUT_REGISTRY if _CHECKOUT_REGISTRY.is_file() else Path(__file__).with_name("tasks.yaml")
ADAPTER_CONFIG = "adapter_config.json"  # the settings file of our adapter folders (hub.py writes them)
MODALITIES = ("image", "video", "audio")
KINDS = ("caption", "qa")
Transform = ImageTransform | VideoTransform | AudioTransform
_TRANSFORMS = {"image": ImageTransform, "video": VideoTransform, "audio": AudioTransform}


@dataclass(frozen=True)
class ModelRef:
    """A pretrained model on the Hub (an OPT LM, or a transformers encoder)."""

    id: str
    revision: str = "main"
    name: str = ""  # for people ("OPT-2.7B"); the id when empty

    @property
    def display_name(self) -> str:
        return self.name or self.id


@dataclass(frozen=True)
class EncoderRef:
    """`library: timm` -> `id` is a timm name with its pretrained tag; `transformers` -> a Hub id.
    `config` holds config overrides (AST's layer-norm epsilon)."""

    library: str
    id: str
    revision: str = "main"
    name: str = ""  # for people ("ViT-B/16"); the id when empty
    config: tuple[tuple[str, object], ...] = ()

    @property
    def display_name(self) -> str:
        return self.name or self.id


@dataclass(frozen=True)
class AdapterSource:
    """Where the adapter file is: `filename` in a Hub repo, or a local path when `repo_id` is empty."""

    filename: str
    repo_id: str = ""
    repo_type: str = "model"
    revision: str = "main"


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
        if self.answer_token and self.answer_token not in self.prompt:
            raise ValueError(f"answer_token {self.answer_token!r} does not occur in the prompt {self.prompt!r}")

    def render(self, question: str | None) -> str:
        if "{question}" not in self.prompt:
            return self.prompt
        question = (question or "").strip()
        if self.question_mark and not question.endswith("?"):
            question += "?"
        return self.prompt.format(question=question)

    def prompt_ids(self, tokenizer, question: str | None) -> list[int]:
        """The LM input at inference: BOS then the rendered prompt (the original tokenizer call)."""
        return [tokenizer.bos_token_id] + tokenizer(self.render(question), add_special_tokens=False).input_ids

    def training_ids(self, tokenizer, question: str | None, answer: str) -> list[int]:
        """What the original trained on: BOS, the prompt, the caption or answer, EOS
        (`caption</s>`, `question?</a>answer</s>`); it starts with `prompt_ids`."""
        text = self.render(question) + answer + tokenizer.eos_token
        return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids


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
        for name in ("lr", "prompt_lr", "warmup_lr", "min_lr"):  # YAML reads `2e-5` (no dot) as a string
            object.__setattr__(self, name, float(getattr(self, name)))
        if int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise ValueError("training: epochs and batch_size must be at least 1")


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
    training: TrainingRecipe | None = None  # the released adapter's recipe; None for a task that states none

    @property
    def needs_question(self) -> bool:
        return self.kind == "qa"

    @property
    def menu_label(self) -> str:
        """What a person picks the task by, e.g. "VQAv2 · OPT-2.7B + ViT-B/16"."""
        return f"{self.label} · {self.lm.display_name} + {self.encoder.display_name}"


class RegistryError(UserError, ValueError):
    """The registry file is malformed; the message names the task and the field."""


def _build(task_id: str, entry: dict, base_dir: Path) -> Task:
    def section(name: str) -> dict:
        value = entry.get(name)
        if not isinstance(value, dict):
            raise RegistryError(f"task {task_id!r}: '{name}' must be a mapping")
        return value

    try:
        entry = {**_trained_adapter_settings(entry, base_dir), **entry}
        modality, kind = entry["modality"], entry["kind"]
        if modality not in MODALITIES or kind not in KINDS:
            raise RegistryError(f"task {task_id!r}: modality must be one of {MODALITIES} and kind one of {KINDS}")
        lm = ModelRef(**section("lm"))
        encoder = dict(section("encoder"))
        encoder["config"] = tuple(sorted(encoder.get("config", {}).items()))
        adapter = dict(section("adapter"))
        if not adapter.get("repo_id"):  # a local file, relative to the registry
            adapter["filename"] = str((base_dir / os.path.expanduser(adapter["filename"])).resolve())
        return Task(
            id=task_id,
            title=entry.get("title", task_id),
            label=entry.get("label", entry.get("title", task_id)),
            modality=modality,
            kind=kind,
            lm=lm,
            encoder=EncoderRef(**encoder),
            preprocess=_TRANSFORMS[modality](**section("preprocess")),
            injection=InjectionConfig(**section("injection")),
            text=TextFormat(**section("text")),
            generation=DecodingOptions(**section("generation")),
            adapter=AdapterSource(**adapter),
            training=TrainingRecipe(**section("training")) if "training" in entry else None,
        )
    except RegistryError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"task {task_id!r} in the registry: {exc}") from exc


def answer_tokens(tasks: Iterable[Task], lm: ModelRef) -> list[str]:
    """The special tokens the tokenizer of `lm` needs: the answer tokens of every task on that LM,
    so that one shared tokenizer reads every task's prompt as its training script did."""
    return sorted({task.text.answer_token for task in tasks if task.lm == lm and task.text.answer_token})


# The generation settings that belong to a task (stored with an adapter, so that it decodes as its task did);
# the token ids come from the tokenizer and the seed from the call.
TASK_GENERATION_KEYS = tuple(
    f.name for f in fields(DecodingOptions) if f.name not in ("eos_token_id", "pad_token_id", "seed")
)


def _trained_adapter_settings(entry: dict, base_dir: Path) -> dict:
    """An entry may name only a local adapter folder of our format (`adapter: {filename: ./my-adapter}`):
    its `adapter_config.json` then gives the task's settings (those of the task it was trained from)."""
    adapter = entry.get("adapter")
    if not isinstance(adapter, dict) or adapter.get("repo_id") or "filename" not in adapter or "modality" in entry:
        return {}
    config_file = base_dir / os.path.expanduser(adapter["filename"]) / ADAPTER_CONFIG
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text())
    keys = ("title", "label", "modality", "kind", "lm", "encoder", "preprocess", "injection", "text", "generation")
    return {k: config[k] for k in keys if k in config}  # "label": older folders lack it (the title stands in)


def task_from_adapter(folder: str | Path, task_id: str, weights: AdapterSource | None = None) -> Task:
    """The task an adapter folder of our format was trained or converted for, its weights that folder
    or `weights` (a Hub repo's file, fetched when the adapter loads)."""
    folder = Path(folder).expanduser().resolve()
    if not (folder / ADAPTER_CONFIG).is_file():
        raise RegistryError(f"{folder} is not an adapter folder: it has no {ADAPTER_CONFIG}")
    task = _build(task_id, {"adapter": {"filename": str(folder)}}, folder)
    return task if weights is None else replace(task, adapter=weights)


def load_registry(path: str | Path | None = None) -> dict[str, Task]:
    """All tasks of a registry file (default: the project's `checkpoints/tasks.yaml`, or the
    file named by the EPALM_TASKS environment variable)."""
    path = Path(path or os.environ.get("EPALM_TASKS") or DEFAULT_REGISTRY)
    return _load(path.resolve())


@functools.lru_cache(maxsize=8)
def _load(path: Path) -> dict[str, Task]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"cannot read the task registry {path}: {exc}") from exc
    entries = (data or {}).get("tasks")
    if not isinstance(entries, dict) or not entries:
        raise RegistryError(f"{path}: no 'tasks' mapping")
    for task_id in entries:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(task_id)):
            raise RegistryError(f"{path}: task id {task_id!r} must be letters, digits, '-', '_' or '.'")
    return {str(k): _build(str(k), v, path.parent) for k, v in entries.items()}


def get_task(task_id: str, registry: dict[str, Task] | None = None) -> Task:
    tasks = registry if registry is not None else load_registry()
    if task_id not in tasks:
        raise KeyError(f"unknown task {task_id!r}; known tasks: {', '.join(tasks)}")
    return tasks[task_id]

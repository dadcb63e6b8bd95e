"""The task registry: what each released adapter needs, read from `checkpoints/tasks.yaml`.

A task names its LM, its encoder, the preprocessing, the injection and prompt settings, the text
format, its decoding settings (the paper's, plus the fewest new tokens a long question leaves room
for), where its adapter lives on the Hub and the recipe that adapter was trained with. Users add tasks or
point one at their own adapter by editing the YAML (or passing another file); no code changes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .audio import AudioTransform, prepare_audio
from .decoding import DecodingOptions
from .errors import UserError, bounded
from .image import ImageTransform, prepare_image
from .media import MediaLimits
from .model import InjectionConfig
from .video import VideoTransform, prepare_video

# The repository's checkpoints/tasks.yaml (a checkout or an editable install); a wheel carries it as epalm/tasks.yaml
_CHECKOUT_REGISTRY = Path(__file__).resolve().parents[1] / "checkpoints" / "tasks.yaml"
DEFAULT_REGISTRY = _CHECKOUT_REGISTRY if _CHECKOUT_REGISTRY.is_file() else Path(__file__).with_name("tasks.yaml")
ADAPTER_CONFIG = "adapter_config.json"  # an adapter folder: its task's settings (`AdapterConfig`)
ADAPTER_WEIGHTS = "adapter.safetensors"  # and its tensors (`adapter_format`)
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is ~2 KB
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # a number in exponent form
MAX_TEXT = 200  # characters of any id, name, title or prompt in a registry entry or an adapter config
MODALITIES = ("image", "video", "audio")
KINDS = ("caption", "qa")
KIND_WORDS = {"caption": "captioning", "qa": "question answering"}
MEDIA_NAMES = {"image": "an image", "video": "a video", "audio": "an audio clip"}
Transform = ImageTransform | VideoTransform | AudioTransform
_TRANSFORMS = {"image": ImageTransform, "video": VideoTransform, "audio": AudioTransform}
_PREPARE = {"image": prepare_image, "video": prepare_video, "audio": prepare_audio}


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


class RegistryError(UserError, ValueError):
    """The registry file is malformed; the message names the task and the field."""


def _build(task_id: str, entry: object, base_dir: Path, where: str = "") -> Task:
    """A task from its registry entry (or an adapter config), every value checked (`_settings`);
    a RegistryError names the task (or `where`) and the field."""
    try:
        if not isinstance(entry, dict):
            raise ValueError("must be a mapping")
        entry = {**_trained_adapter_settings(entry, base_dir), **entry}
        modality, kind = entry.get("modality"), entry.get("kind")
        if modality not in MODALITIES or kind not in KINDS:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)} and kind one of {', '.join(KINDS)}")
        lm = _section(ModelRef, entry.get("lm"), "lm")
        encoder = dict(_settings(EncoderRef, entry.get("encoder"), "encoder", config=dict))
        encoder["config"] = tuple(sorted(_overrides(encoder.get("config", {})).items()))
        adapter = _settings(AdapterSource, entry.get("adapter"), "adapter")
        if not adapter.get("repo_id"):  # a local file, relative to the registry
            adapter["filename"] = str((base_dir / os.path.expanduser(adapter["filename"])).resolve())
        return Task(
            id=task_id,
            title=_value(entry.get("title", task_id), str, "title"),
            label=_value(entry.get("label", entry.get("title", task_id)), str, "label"),
            modality=modality,
            kind=kind,
            lm=lm,
            encoder=EncoderRef(**encoder),
            preprocess=_section(_TRANSFORMS[modality], entry.get("preprocess"), "preprocess"),
            injection=_section(InjectionConfig, entry.get("injection"), "injection"),
            text=_section(TextFormat, entry.get("text"), "text"),
            generation=_section(DecodingOptions, entry.get("generation"), "generation"),
            adapter=AdapterSource(**adapter),
            paper=_paper(entry.get("paper")),
            training=_section(TrainingRecipe, entry["training"], "training") if "training" in entry else None,
        )
    except (KeyError, TypeError, ValueError) as exc:  # RegistryError is a ValueError
        raise RegistryError(f"{where or f'task {task_id!r}'}: {exc}") from exc


def _section(cls: type, value: object, where: str) -> Any:
    """The dataclass `cls` built from `value`, every field checked; a bad value names its field."""
    settings = _settings(cls, value, where)
    try:
        return cls(**settings)
    except ValueError as exc:  # a bound of the dataclass's own: its message starts with the field's name
        named = str(exc).split(" ", 1)[0] in settings
        raise ValueError(f"{where}.{exc}" if named else f"{where}: {exc}") from None


def _settings(cls: type, value: object, where: str, **special: type) -> dict[str, Any]:
    """`value` as keyword arguments of the dataclass `cls`: a mapping of its fields only, each of its
    declared type (`special`: fields read as is, of that type). Untrusted input (a stranger's adapter
    config) is read the same way as the registry: nothing else reaches the constructors."""
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(key) for key in value if key not in known)
    if unknown:
        raise ValueError(f"{where} has no setting {_shown(unknown[0])} (it has {', '.join(known)})")
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in value and _required(f)]
    if missing:
        raise ValueError(f"{where}.{missing[0]} is missing")
    checked = {}
    for name, item in value.items():
        kind = special.get(name, hints[name])
        checked[name] = item if name in special and isinstance(item, kind) else _value(item, kind, f"{where}.{name}")
    return checked


def _value(value: object, kind: Any, where: str) -> Any:
    """`value` if it is of the declared type `kind` (numbers finite, strings at most MAX_TEXT characters
    of UTF-8 text, tuples of their length), else a ValueError naming `where`."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(option for option in options if option is not type(None))
    if typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)):
        parts = typing.get_args(kind)
        if len(value) == len(parts):
            return tuple(_value(item, part, f"{where}[{i}]") for i, (item, part) in enumerate(zip(value, parts)))
    elif kind is bool and isinstance(value, bool):
        return value
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is float and isinstance(value, str) and _EXPONENT.fullmatch(value):  # YAML 1.1 reads 3e-4 as text
        return float(value)
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    elif kind is str and isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise ValueError(f"{where} is {len(value):,} characters long; the limit is {MAX_TEXT}")
        if not value.isprintable():  # control characters, lone surrogates
            raise ValueError(f"{where} must be printable text")
        return value
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    expected = names.get(kind, f"a list of {len(typing.get_args(kind))}")
    raise ValueError(f"{where} must be {expected}, not {_shown(value)}")


def _overrides(config: object) -> dict[str, object]:
    """An encoder's config overrides (AST's layer-norm epsilon): a few named numbers, flags or words."""
    if not isinstance(config, dict) or len(config) > 16:
        raise ValueError("encoder.config must be a mapping of at most 16 settings")
    checked = {}
    for key, value in config.items():
        kind = type(value) if isinstance(value, (bool, int, float, str)) else str
        checked[_value(key, str, "encoder.config")] = _value(value, kind, f"encoder.config.{key}")
    return checked


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _shown(value: object) -> str:
    """A value as a message may quote it: short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "…"


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
# what an adapter config holds of its task: all but the id (the caller's) and where the weights are (beside it)
_TASK_KEYS = ("title", "label", "modality", "kind", "lm", "encoder", "preprocess", "injection", "text", "generation")


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
        data = _config_data(folder)
        try:
            entry = {key: data[key] for key in _TASK_KEYS if key in data}
            task = _build(task_id, {**entry, "adapter": {"filename": str(folder)}}, folder, where=ADAPTER_CONFIG)
            base_task = _value(data.get("base_task"), str | None, "base_task")
            tiny = _value(data.get("tiny", False), bool, "tiny")
            training = data.get("training")
            if training is not None and not isinstance(training, dict):
                raise ValueError("training must be a mapping")
        except ValueError as exc:
            raise RegistryError(str(exc) if isinstance(exc, RegistryError) else f"{ADAPTER_CONFIG}: {exc}") from exc
        return cls(task if weights is None else replace(task, adapter=weights), base_task, tiny, training)


def _config_data(folder: Path) -> dict:
    """The JSON object of `folder`'s adapter config, read within `MAX_CONFIG_BYTES`."""
    path = folder / ADAPTER_CONFIG
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES // 1024} KB")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"not an adapter folder: it has no {ADAPTER_CONFIG}") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RegistryError(f"{ADAPTER_CONFIG} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{ADAPTER_CONFIG} must hold a JSON object")
    return data


def _trained_adapter_settings(entry: dict, base_dir: Path) -> dict:
    """An entry may name only a local adapter folder of our format (`adapter: {filename: ./my-adapter}`):
    its `adapter_config.json` then gives the task's settings (those of the task it was trained from)."""
    adapter = entry.get("adapter")
    if not isinstance(adapter, dict) or adapter.get("repo_id") or "filename" not in adapter or "modality" in entry:
        return {}
    folder = base_dir / os.path.expanduser(str(adapter["filename"]))
    if not (folder / ADAPTER_CONFIG).is_file():
        return {}
    data = _config_data(folder)
    return {key: data[key] for key in _TASK_KEYS if key in data}  # "label": older folders lack it (the title stands in)


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

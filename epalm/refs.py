"""Where each task's models and adapter are, read from the registry without building the tasks.

`ModelRef`, `EncoderRef` and `AdapterSource` name what a task needs from the Hub; `read_task_refs` reads
them, with each task's id, title, modality and kind, from a registry file, every value checked as
`tasks.load_registry` checks it. Nothing here imports torch: `python -m epalm tasks` and `download`, and
the CLI's checks of its arguments, answer in well under a second. `tasks` builds the full tasks (their
preprocessing, injection and decoding settings) from the same entries with the same checkers.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

# The repository's checkpoints/tasks.yaml (a checkout or an editable install); a wheel carries it as epalm/tasks.yaml
_CHECKOUT_REGISTRY = Path(__file__).resolve().parents[1] / "checkpoints" / "tasks.yaml"
DEFAULT_REGISTRY = _CHECKOUT_REGISTRY if _CHECKOUT_REGISTRY.is_file() else Path(__file__).with_name("tasks.yaml")
ADAPTER_CONFIG = "adapter_config.json"  # an adapter folder: its task's settings (`tasks.AdapterConfig`)
ADAPTER_WEIGHTS = "adapter.safetensors"  # and its tensors (`adapter_format`)
ADAPTER_PREFIX = "adapter:"  # the task ids of users' adapters start with it
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is ~2 KB
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # a number in exponent form
MAX_TEXT = 200  # characters of any id, name, title or prompt in a registry entry or an adapter config
MODALITIES = ("image", "video", "audio")
KINDS = ("caption", "qa")
# what an adapter config holds of its task: all but the id (the caller's) and where the weights are (beside it)
TASK_KEYS = ("title", "label", "modality", "kind", "lm", "encoder", "preprocess", "injection", "text", "generation")


def adapter_task_id(source: str) -> str:
    """The task id a user's adapter is served under (answers and timings name it)."""
    return ADAPTER_PREFIX + source


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
    `config` holds config overrides (AST's layer-norm epsilon). `repo`: the Hub repo of a timm encoder's
    weights (e.g. timm/vit_base_patch16_224.augreg_in21k_ft_in1k, which `revision` pins); empty: where
    timm's own record says, which takes importing timm (and torch) to look up. Where the weights are is
    not what the encoder is: two refs that differ only there are the same encoder."""

    library: str
    id: str
    revision: str = "main"
    name: str = ""  # for people ("ViT-B/16"); the id when empty
    config: tuple[tuple[str, object], ...] = ()
    repo: str = field(default="", compare=False)

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


class RegistryError(UserError, ValueError):
    """The registry file is malformed; the message names the task and the field."""


def settings(cls: type, value: object, where: str, **special: type) -> dict[str, Any]:
    """`value` as keyword arguments of the dataclass `cls`: a mapping of its fields only, each of its
    declared type (`special`: fields read as is, of that type). Untrusted input (a stranger's adapter
    config) is read the same way as the registry: nothing else reaches the constructors."""
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(key) for key in value if key not in known)
    if unknown:
        raise ValueError(f"{where} has no setting {quoted(unknown[0])} (it has {', '.join(known)})")
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in value and _required(f)]
    if missing:
        raise ValueError(f"{where}.{missing[0]} is missing")
    checked = {}
    for name, item in value.items():
        kind = special.get(name, hints[name])
        checked[name] = (
            item if name in special and isinstance(item, kind) else check_value(item, kind, f"{where}.{name}")
        )
    return checked


def check_value(value: object, kind: Any, where: str) -> Any:
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
            return tuple(check_value(item, part, f"{where}[{i}]") for i, (item, part) in enumerate(zip(value, parts)))
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
    raise ValueError(f"{where} must be {expected}, not {quoted(value)}")


def _overrides(config: object) -> dict[str, object]:
    """An encoder's config overrides (AST's layer-norm epsilon): a few named numbers, flags or words."""
    if not isinstance(config, dict) or len(config) > 16:
        raise ValueError("encoder.config must be a mapping of at most 16 settings")
    checked = {}
    for key, value in config.items():
        kind = type(value) if isinstance(value, (bool, int, float, str)) else str
        checked[check_value(key, str, "encoder.config")] = check_value(value, kind, f"encoder.config.{key}")
    return checked


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def quoted(value: object) -> str:
    """A value as a message may quote it: short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "…"


def config_data(folder: Path) -> dict:
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
    except OSError as exc:  # its reason alone: the path may be where this machine's cache keeps it
        raise RegistryError(f"{ADAPTER_CONFIG} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RegistryError(f"{ADAPTER_CONFIG} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{ADAPTER_CONFIG} must hold a JSON object")
    return data


def with_adapter_settings(entry: dict, base_dir: Path) -> dict:
    """The entry, completed: an entry may name only a local adapter folder of our format (`adapter:
    {filename: ./my-adapter}`), whose `adapter_config.json` then gives the task's settings (those of the
    task it was trained from); what the entry sets itself wins."""
    adapter = entry.get("adapter")
    if not isinstance(adapter, dict) or adapter.get("repo_id") or "filename" not in adapter or "modality" in entry:
        return entry
    folder = base_dir / os.path.expanduser(str(adapter["filename"]))
    if not (folder / ADAPTER_CONFIG).is_file():
        return entry
    data = config_data(folder)
    return {**{key: data[key] for key in TASK_KEYS if key in data}, **entry}  # older folders lack "label"


@dataclass(frozen=True)
class TaskRefs:
    """A task as far as the Hub and the command line need it: what it is, and where its files are."""

    id: str
    title: str
    label: str
    modality: str
    kind: str
    lm: ModelRef
    encoder: EncoderRef
    adapter: AdapterSource

    @property
    def needs_question(self) -> bool:
        return self.kind == "qa"


def task_refs(task_id: str, entry: dict, base_dir: Path) -> TaskRefs:
    """The refs of one entry (an adapter folder's settings already merged in: `with_adapter_settings`);
    a ValueError names the field."""
    modality, kind = entry.get("modality"), entry.get("kind")
    if modality not in MODALITIES or kind not in KINDS:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)} and kind one of {', '.join(KINDS)}")
    lm = ModelRef(**settings(ModelRef, entry.get("lm"), "lm"))
    encoder = dict(settings(EncoderRef, entry.get("encoder"), "encoder", config=dict))
    encoder["config"] = tuple(sorted(_overrides(encoder.get("config", {})).items()))
    adapter = settings(AdapterSource, entry.get("adapter"), "adapter")
    if not adapter.get("repo_id"):  # a local file, relative to the registry
        adapter["filename"] = str((base_dir / os.path.expanduser(adapter["filename"])).resolve())
    return TaskRefs(
        id=task_id,
        title=check_value(entry.get("title", task_id), str, "title"),
        label=check_value(entry.get("label", entry.get("title", task_id)), str, "label"),
        modality=modality,
        kind=kind,
        lm=lm,
        encoder=EncoderRef(**encoder),
        adapter=AdapterSource(**adapter),
    )


def registry_path(path: str | Path | None = None) -> Path:
    """The registry file: `path`, else $EPALM_TASKS, else the project's `checkpoints/tasks.yaml`."""
    return Path(path or os.environ.get("EPALM_TASKS") or DEFAULT_REGISTRY).resolve()


def read_entries(path: Path) -> dict[str, object]:
    """The registry file's task entries by id (as written: each is checked where it is built)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"cannot read the task registry {path}: {exc}") from exc
    entries = (data or {}).get("tasks") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise RegistryError(f"{path}: no 'tasks' mapping")
    for task_id in entries:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(task_id)):
            raise RegistryError(f"{path}: task id {task_id!r} must be letters, digits, '-', '_' or '.'")
    return {str(task_id): entry for task_id, entry in entries.items()}


def read_task_refs(path: str | Path | None = None) -> dict[str, TaskRefs]:
    """The refs of every task of a registry file (see `registry_path`)."""
    return _read_task_refs(registry_path(path))


@functools.lru_cache(maxsize=8)
def _read_task_refs(path: Path) -> dict[str, TaskRefs]:
    refs = {}
    for task_id, entry in read_entries(path).items():
        try:
            if not isinstance(entry, dict):
                raise ValueError("must be a mapping")
            refs[task_id] = task_refs(task_id, with_adapter_settings(entry, path.parent), path.parent)
        except (KeyError, TypeError, ValueError) as exc:  # RegistryError is a ValueError
            raise RegistryError(f"task {task_id!r}: {exc}") from exc
    return refs

"""Adapters that users trained (`python -m epalm train`) or converted: a folder or a Hub repo in our
format (`adapter.safetensors` + `adapter_config.json`), turned into a task next to the registry's.

The adapter's config names the LM, encoder and settings it was trained with, so a pipeline that
already holds that LM and encoder serves it without loading them again. Its config is a stranger's
input: every value is checked (`tasks.AdapterConfig`) and the settings must fit the models they name
(`check_fits`) before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import astuple
from pathlib import Path

from .errors import AdapterError
from .hub import YOU_GAVE, RepoFiles, is_repo_id, locate
from .refs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterSource, RegistryError
from .tasks import KIND_WORDS, AdapterConfig, Task

MAX_SOURCE = 1024  # characters of an adapter's name: a Hub repo id (at most 96) or a folder's path
# the preprocessing an encoder's input shape depends on (num_frames is free: TimeSformer takes any count)
_FIXED_SHAPE = {"image": ("size",), "video": ("size",), "audio": ("sample_rate", "mel_bins", "target_length")}
ADAPTER_PREFIX = "adapter:"  # the task ids of users' adapters start with it


def adapter_task_id(source: str) -> str:
    """The task id a user's adapter is served under (answers and timings name it)."""
    return ADAPTER_PREFIX + source


def shown(source: str) -> str:
    """An adapter's name as a message quotes it: at most 60 characters."""
    return source if len(source) <= 60 else source[:57] + "…"


def check_source(source: str, allow_local: bool) -> None:
    """Refuse a name no adapter can have, and anything but a Hub repo id where local adapters are not
    allowed (their folder is never looked at)."""
    if len(source) > MAX_SOURCE or "\0" in source or not source.isprintable():
        raise AdapterError(f"Adapter {shown(source)!r} is not a Hub repo id (user/name) nor a folder's path.")
    if not allow_local and not is_repo_id(source):
        raise AdapterError(
            f"Adapter {shown(source)!r} is not a Hub repo id (user/name); adapter folders on this machine are not "
            "accepted here."
        )


def resolve_adapter(source: str, allow_local: bool = True, revision: str = "main") -> tuple[Path, AdapterSource | None]:
    """The folder holding an adapter's config, given a folder path or a Hub repo id, and for a Hub repo
    where its weights are. Only the config is downloaded (into the Hugging Face cache): the weights come
    when the adapter loads, so a caller can refuse the adapter first. `allow_local=False` refuses
    folders (a public app must not read the server's disk)."""
    check_source(source, allow_local)
    path = Path(source).expanduser()
    try:
        exists = allow_local and path.exists()  # not looked up otherwise: a public app must not say what exists
    except OSError:  # a name too long for the file system
        exists = False
    if exists:
        if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
            raise AdapterError(f"{path} is not an adapter folder: it needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}.")
        return path.resolve(), None
    if not is_repo_id(source):
        raise AdapterError(f"Adapter {shown(source)!r} is neither an existing folder nor a Hub repo id (user/name).")
    files = RepoFiles(f"the adapter {source}", source, revision, files=(ADAPTER_CONFIG,), named=YOU_GAVE)
    weights = AdapterSource(filename=ADAPTER_WEIGHTS, repo_id=source, revision=revision)
    return locate(files)[ADAPTER_CONFIG].parent, weights


def read_adapter_config(source: str, allow_local: bool = True) -> AdapterConfig:
    """A trained adapter's config (its task id: `adapter_task_id(source)`), every value checked."""
    folder, weights = resolve_adapter(source, allow_local)
    try:
        return AdapterConfig.read(folder, adapter_task_id(source), weights)
    except RegistryError as exc:
        raise AdapterError(f"The adapter {shown(source)} cannot be used: {exc}.") from exc


def check_fits(task: Task, registry: Iterable[Task]) -> None:
    """Refuse an adapter whose preprocessing does not give its encoder the input shape the registry's
    tasks give that encoder (e.g. 512-pixel images for a 224-pixel ViT): the encoder would fail, or
    run at a cost nobody planned for."""
    for known in registry:
        if (known.encoder, known.modality) != (task.encoder, task.modality):
            continue
        for name in _FIXED_SHAPE[task.modality]:
            theirs, ours = getattr(known.preprocess, name), getattr(task.preprocess, name)
            if theirs != ours:
                raise AdapterError(
                    f"The adapter's preprocess.{name} is {ours}, but its encoder {task.encoder.display_name} "
                    f"takes {theirs}."
                )
        return


def check_served_models(task: Task, served: Iterable[Task]) -> None:
    """Refuse an adapter whose LM or encoder no `served` task uses: an app serves users' adapters on
    the models it already has, rather than download whatever a stranger's adapter config names."""
    served = list(served)
    lms = {astuple(t.lm)[:2] for t in served}
    encoders = {(t.encoder.id, t.encoder.revision) for t in served}
    if astuple(task.lm)[:2] in lms and (task.encoder.id, task.encoder.revision) in encoders:
        return
    models = sorted({f"{t.lm.display_name} + {t.encoder.display_name}" for t in served if t.modality == task.modality})
    raise AdapterError(
        f"The adapter was trained on {task.lm.display_name} + {task.encoder.display_name}, which this app does not "
        f"serve; its {task.modality} models: {', '.join(models) or 'none'}."
    )


def check_mode(task: Task, modality: str | None, kind: str, source: str) -> None:
    """Refuse an adapter used for what it was not trained for (a captioning adapter asked a question,
    an image adapter given audio), saying what it is for."""
    if task.kind == kind and task.modality == (modality or task.modality):
        return
    media = {"image": "images", "video": "videos", "audio": "audio clips"}[task.modality]
    use = f"caption {media}" if task.kind == "caption" else f"answer questions about {media}"
    raise AdapterError(
        f"The adapter {shown(source)} was trained for {task.modality} {KIND_WORDS[task.kind]}, not "
        f"{modality or task.modality} {KIND_WORDS[kind]}: use it to {use}."
    )

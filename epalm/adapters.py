"""Adapters that users trained (`python -m epalm train`) or converted: a folder or a Hub repo in our
format (`adapter.safetensors` + `adapter_config.json`), turned into a task next to the registry's.

The adapter's config names the LM, encoder and settings it was trained with, so a pipeline that
already holds that LM and encoder serves it without loading them again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .hub import ADAPTER_WEIGHTS, AdapterError, RepoFiles, is_repo_id, locate
from .tasks import ADAPTER_CONFIG, AdapterSource, RegistryError, Task, task_from_adapter


def check_source(source: str, allow_local: bool) -> None:
    """Refuse anything but a Hub repo id where local adapters are not allowed (their folder is never looked at)."""
    if not allow_local and not is_repo_id(source):
        raise AdapterError(
            f"Adapter {source!r} is not a Hub repo id (user/name). Local adapter folders are allowed only when "
            "local adapters are (`Pipeline(allow_local_adapters=True)`; the app's --allow-local-adapters, "
            "EPALM_ALLOW_LOCAL_ADAPTERS=1)."
        )


def resolve_adapter(source: str, allow_local: bool = True, revision: str = "main") -> tuple[Path, AdapterSource | None]:
    """The folder holding an adapter's config, given a folder path or a Hub repo id, and for a Hub repo
    where its weights are. Only the config is downloaded (into the Hugging Face cache): the weights come
    when the adapter loads, so a caller can refuse the adapter first. `allow_local=False` refuses
    folders (a public app must not read the server's disk)."""
    path = Path(source).expanduser()
    if allow_local and path.exists():  # not looked up otherwise: a public app must not say what exists
        if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
            raise AdapterError(f"{path} is not an adapter folder: it needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}.")
        return path.resolve(), None
    check_source(source, allow_local)
    if not is_repo_id(source):
        raise AdapterError(f"Adapter {source!r} is neither an existing folder nor a Hub repo id (user/name).")
    files = RepoFiles(f"the adapter {source}", source, revision, files=(ADAPTER_CONFIG,), named="you gave")
    weights = AdapterSource(filename=ADAPTER_WEIGHTS, repo_id=source, revision=revision)
    return locate(files)[ADAPTER_CONFIG].parent, weights


def adapter_task(source: str, allow_local: bool = True) -> tuple[Task, bool]:
    """The task of a trained adapter (its id: `adapter:<source>`) and whether it was trained on the
    tiny test models."""
    folder, weights = resolve_adapter(source, allow_local)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        return task_from_adapter(folder, f"adapter:{source}", weights), bool(config.get("tiny", False))
    except (ValueError, RegistryError) as exc:  # JSONDecodeError is a ValueError
        raise AdapterError(f"{folder / ADAPTER_CONFIG} is not a valid adapter config: {exc}") from exc


def check_served_models(task: Task, served: Iterable[Task]) -> None:
    """Refuse an adapter whose LM or encoder no `served` task uses: an app serves users' adapters on
    the models it already has, rather than download whatever a stranger's adapter config names."""
    served = list(served)
    lms = {(t.lm.id, t.lm.revision) for t in served}
    encoders = {(t.encoder.id, t.encoder.revision) for t in served}
    if (task.lm.id, task.lm.revision) in lms and (task.encoder.id, task.encoder.revision) in encoders:
        return
    models = sorted({f"{t.lm.display_name} + {t.encoder.display_name}" for t in served if t.modality == task.modality})
    raise AdapterError(
        f"The adapter was trained on {task.lm.display_name} + {task.encoder.display_name}, which this app does not "
        f"serve; its {task.modality} models: {', '.join(models) or 'none'}."
    )

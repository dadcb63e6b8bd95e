"""Adapters that users trained (`python -m epalm train`) or converted: a folder or a Hub repo in our
format (`adapter.safetensors` + `adapter_config.json`), turned into a task next to the registry's.

The adapter's config names the LM, encoder and settings it was trained with, so a pipeline that
already holds that LM and encoder serves it without loading them again. Its config is a stranger's
input: every value is checked (`tasks.AdapterConfig`) and the settings must fit the models they name
(`check_fits`) before anything runs. `UsersAdapters` keeps a bounded few of them ready, each served as
its files are now.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import AdapterError, UserError
from .hub import YOU_GAVE, RepoFiles, is_repo_id, locate, remote
from .media import describe_bytes
from .refs import ADAPTER_CONFIG, ADAPTER_PREFIX, ADAPTER_WEIGHTS, AdapterSource, RegistryError, adapter_task_id
from .tasks import KIND_WORDS, AdapterConfig, Task

MAX_SOURCE = 1024  # characters of an adapter's name: a Hub repo id (at most 96) or a folder's path
# the preprocessing an encoder's input shape depends on (num_frames is free: TimeSformer takes any count)
_FIXED_SHAPE = {"image": ("size",), "video": ("size",), "audio": ("sample_rate", "mel_bins", "target_length")}


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


def read_adapter_config(source: str, allow_local: bool = True, revision: str = "main") -> AdapterConfig:
    """A trained adapter's config (its task id: `adapter_task_id(source)`), every value checked."""
    folder, weights = resolve_adapter(source, allow_local, revision)
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
    lms = {(t.lm.id, t.lm.revision) for t in served}
    encoders = {(t.encoder.id, t.encoder.revision) for t in served}
    if (task.lm.id, task.lm.revision) in lms and (task.encoder.id, task.encoder.revision) in encoders:
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


MAX_USERS_ADAPTERS = 8  # users' adapters kept ready at once
MAX_USERS_ADAPTER_BYTES = 512 * 2**20  # their weights together (an OPT-2.7B adapter is ~50 MB in float32)
MAX_ADAPTER_DOWNLOAD = 256 * 2**20  # one adapter's weights file, checked before it downloads
RECHECK_S = 60.0  # a Hub adapter's branch is asked for its commit at most this often


class Busy(UserError):
    """Every kept users' adapter is in use: the request should come back later."""


@dataclass
class _Served:
    task: Task
    stamp: tuple  # the identity of its files: a folder's sizes and times, a Hub repo's commit
    size: int  # bytes of its weights
    checked: float  # time.monotonic() of the last check of the stamp
    users: int = 0  # requests using it now


class UsersAdapters:
    """The users' adapters a pipeline serves, read and checked once each and kept ready: at most
    `max_count` of them and `max_bytes` of weights, the least recently used one unloaded first (through
    `unload(task_id)`), and a `Busy` refusal rather than growth when every kept one is in use. Each is
    served as its files are now: a folder retrained in place (its files' sizes or times changed), or a
    Hub branch that moved (asked at most every `recheck_s`), is read again and its old weights unloaded.
    A folder is one adapter however it is spelled (`runs/b1`, `./runs/b1/`, `~/…`). A Hub adapter's
    weights are refused above `max_download` bytes before they download."""

    def __init__(
        self,
        unload: Callable[[str], None],
        max_count: int = MAX_USERS_ADAPTERS,
        max_bytes: int = MAX_USERS_ADAPTER_BYTES,
        max_download: int = MAX_ADAPTER_DOWNLOAD,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self.unload, self.max_count, self.max_bytes = unload, max_count, max_bytes
        self.max_download, self.recheck_s = max_download, recheck_s
        self._served: OrderedDict[str, _Served] = OrderedDict()  # task id -> what is kept, least recent first
        self._lock = threading.Lock()

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._served

    def __len__(self) -> int:
        return len(self._served)

    def get(self, task_id: str) -> Task | None:
        served = self._served.get(task_id)
        return served.task if served else None

    def task_id(self, source: str, allow_local: bool) -> str:
        """The task id of the adapter `source` names: a folder's by its real path, a repo's by its id."""
        check_source(source, allow_local)
        path = Path(source).expanduser()
        with contextlib.suppress(OSError):
            if allow_local and path.exists():
                return adapter_task_id(os.path.realpath(path))
        return adapter_task_id(source)

    def serve(self, source: str, allow_local: bool, accept: Callable[[AdapterConfig], None]) -> Task:
        """The task of the adapter `source` names, read (again, if its files changed) and kept;
        `accept(config)` refuses an adapter by raising (a refused one is not kept). It comes held for the
        caller: not unloaded to make room for another until `release(task.id)`, so that no other visitor's
        adapter can take its place between its serving and its request's end."""
        task_id = self.task_id(source, allow_local)
        name = task_id.removeprefix(ADAPTER_PREFIX)
        with self._lock:
            served = self._served.get(task_id)
            if served is not None and time.monotonic() - served.checked < self.recheck_s and served.stamp[0] == "hub":
                return self._hold(task_id, served)
        stamp, revision, size = self._stamp(name, allow_local)
        with self._lock:  # (read again: another request may have replaced or unloaded it meanwhile)
            served = self._served.get(task_id)
            unanswered = stamp == ("hub", None) and served is not None and served.stamp[0] == "hub"
            if served is not None and (served.stamp == stamp or unanswered):  # unchanged, or the Hub did not
                served.checked = time.monotonic()  # answer (offline, an error): served as it is
                return self._hold(task_id, served)
        config = read_adapter_config(name, allow_local, revision)
        accept(config)
        with self._lock:
            old = self._served.pop(task_id, None)
            if old is not None and old.stamp == stamp:  # another request read the same files meanwhile
                self._served[task_id] = old
                return self._hold(task_id, old)
            try:
                self._make_room(size)
            except Busy:
                if old is not None:
                    self._served[task_id] = old  # still loaded, still counted
                raise
            self._served[task_id] = _Served(config.task, stamp, size, time.monotonic(), (old.users if old else 0) + 1)
        if old is not None:
            self.unload(task_id)  # its files changed: the next request loads the new weights
        return config.task

    def _hold(self, task_id: str, served: _Served) -> Task:
        """Hold a kept adapter for one more request (the lock held)."""
        self._served.move_to_end(task_id)
        served.users += 1
        return served.task

    def release(self, task_id: str) -> None:
        """Let go of an adapter `serve` held (any other task id: nothing to do)."""
        with self._lock:
            served = self._served.get(task_id)
            if served is not None and served.users > 0:
                served.users -= 1

    def _stamp(self, name: str, allow_local: bool) -> tuple[tuple, str, int]:
        """The identity of the adapter's files now, the revision to read them at, and its weights' size."""
        path, folder = Path(name), False
        with contextlib.suppress(OSError):  # a name too long to be a path
            folder = allow_local and path.is_absolute() and path.is_dir()
        if folder:
            stats = [(path / file).stat() for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if (path / file).is_file()]
            return ("folder", *((s.st_size, s.st_mtime_ns) for s in stats)), "main", stats[-1].st_size if stats else 0
        if not is_repo_id(name):
            raise AdapterError(f"Adapter {shown(name)!r} is neither an existing folder nor a Hub repo id (user/name).")
        files = RepoFiles(f"the adapter {name}", name, files=(ADAPTER_CONFIG,), named=YOU_GAVE)
        now = remote(files, ADAPTER_CONFIG)  # None offline: the cached copy stands
        revision = now.commit if now else "main"
        weights = remote(replace(files, revision=revision), ADAPTER_WEIGHTS) if now else None
        size = weights.size if weights and weights.size is not None else 0
        if size > self.max_download:
            raise AdapterError(
                f"The adapter {shown(name)}'s weights are {describe_bytes(size)}; this app takes adapters of "
                f"up to {describe_bytes(self.max_download)}."
            )
        return ("hub", now.commit if now else None), revision, size  # None: the Hub did not answer

    def _make_room(self, size: int) -> None:
        """Unload the least recently used idle adapters until one more of `size` bytes fits (the lock held)."""

        def full() -> bool:
            return (
                len(self._served) >= self.max_count
                or sum(s.size for s in self._served.values()) + size > self.max_bytes
            )

        for task_id, served in list(self._served.items()):
            if not full():
                return
            if served.users == 0:
                del self._served[task_id]
                self.unload(task_id)
        if full():
            raise Busy("The server is busy with other adapters right now; please try again in a minute.")

    def forget(self, task_id: str) -> None:
        """Stop serving an adapter (one that turned out not to fit its models when it loaded)."""
        with self._lock:
            self._served.pop(task_id, None)
        self.unload(task_id)

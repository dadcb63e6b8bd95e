"""Files from the Hugging Face Hub: what each model needs (`RepoFiles`) and where it is locally.

Everything goes through huggingface_hub (pinned revisions, the standard cache under HF_HOME,
HF_HUB_OFFLINE honoured). Each model's files are named once (`lm_files`, `encoder_files`,
`adapter_files`): exactly what its loader reads, which `python -m epalm download` prefetches and
`python -m epalm tasks` checks. A model whose files are all cached loads without any request (a
branch such as `main` is not re-checked for updates: `download` does that, `locate(refresh=True)`).
`check` makes sure every file can be had before any is downloaded, so that a request fails at once
on a missing adapter rather than after a 5 GB download.
"""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from huggingface_hub import constants as hub_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from tqdm.auto import tqdm

from .errors import Progress, Transfer, UserError, WeightsUnavailable
from .media import describe_bytes, describe_seconds
from .refs import AdapterSource, EncoderRef, ModelRef, TaskRefs

if TYPE_CHECKING:
    from .tasks import Task

# the weight files `from_pretrained` looks for, in its order of preference (timm: the first and third)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# special_tokens_map.json repeats tokenizer_config.json (and, read by transformers 5, prints a line per token on stdout)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt")
HUB_TIMEOUT_S = 10.0  # to tell that the Hub cannot be reached
T = TypeVar("T")
YOU_GAVE = (
    "you gave"  # `RepoFiles.named` of a repo a user named: the messages tell them, not the machine's owner, to check it
)


@dataclass(frozen=True)
class RepoFiles:
    """What one model needs from one Hub repo: every file of `files`, those of `optional` that the
    repo has, and the first of `weights` that it has (with the shards a `.index.json` names)."""

    what: str  # "the language model facebook/opt-2.7b": names the model in messages
    repo_id: str
    revision: str = "main"
    repo_type: str = "model"
    files: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    named: str = "in checkpoints/tasks.yaml"  # where the repo id was given, for the messages' hints (or YOU_GAVE)

    def where(self, filename: str) -> str:
        repo = f"the Space {self.repo_id}" if self.repo_type == "space" else self.repo_id
        return f"{filename} in {repo}" + (f" (revision {self.revision})" if self.revision != "main" else "")


def lm_files(ref: ModelRef) -> RepoFiles:
    """An OPT LM: its config, tokenizer files and weights (what `from_pretrained` reads, nothing else)."""
    what = f"the language model {ref.id}"
    return RepoFiles(what, ref.id, ref.revision, files=("config.json",), optional=TOKENIZER_FILES, weights=WEIGHT_FILES)


def encoder_files(ref: EncoderRef, modality: str) -> RepoFiles:
    """A timm encoder needs only its weights (timm builds the model from its name), from `ref.repo`;
    a transformers encoder, its config and weights."""
    what = f"the {modality} encoder {ref.id}"
    if ref.library != "timm":
        return RepoFiles(what, ref.id, ref.revision, files=("config.json",), weights=WEIGHT_FILES)
    return RepoFiles(what, ref.repo or _timm_repo(ref.id), ref.revision, weights=TIMM_WEIGHT_FILES)


def _timm_repo(name: str) -> str:
    """Where timm's record puts a model's weights (imported here, not above: timm brings torch, which
    the registry's own encoders, whose `repo` it names, never need)."""
    import timm

    pretrained = timm.models.get_pretrained_cfg(name)
    return pretrained.hf_hub_id if pretrained is not None and pretrained.hf_hub_id else f"timm/{name}"


def adapter_files(source: AdapterSource, task_id: str = "") -> RepoFiles | None:
    """The adapter's file on the Hub (None for a local adapter)."""
    if not source.repo_id:
        return None
    what = f"the adapter of {task_id}" if task_id else "the adapter"
    return RepoFiles(what, source.repo_id, source.revision, source.repo_type, files=(source.filename,))


def task_files(task: Task | TaskRefs) -> dict[str, RepoFiles | None]:
    """Everything a task needs from the Hub, by part ("adapter", "lm", "encoder")."""
    return {
        "adapter": adapter_files(task.adapter, task.id),
        "lm": lm_files(task.lm),
        "encoder": encoder_files(task.encoder, task.modality),
    }


def locate(
    files: RepoFiles, progress: Progress | None = None, local_only: bool = False, refresh: bool = False
) -> dict[str, Path]:
    """Local paths of the files a model needs, from the cache or downloaded once (never with
    `local_only` or HF_HUB_OFFLINE=1). An unreachable Hub fails at the first missing file, in seconds.
    `refresh`: ask the Hub for the revision's current commit (a branch moves) and fetch what changed;
    a revision pinned to a commit is never asked again."""
    fetcher = _Fetcher(files, progress, local_only or hub_constants.HF_HUB_OFFLINE, refresh)
    return _walk(files, fetcher.get, lambda name, path: path)


def check(files: RepoFiles) -> int:
    """Make sure every file `files` needs can be had, without downloading any: from the cache, or from
    the Hub (one HEAD request per file not cached; the index of a sharded checkpoint, a few kB, is
    fetched to learn its shards). Returns the bytes still to download (0: all cached). Raises what
    `locate` would, before a single large file is fetched."""
    fetcher = _Fetcher(files, None, hub_constants.HF_HUB_OFFLINE)
    found = _walk(files, fetcher.size, lambda name, size: fetcher.get(name, required=True))
    return sum(found.values())


def _walk(files: RepoFiles, get: Callable[[str, bool], T | None], index: Callable[[str, T], Path]) -> dict[str, T]:
    """`get(name, required)` for each file `files` needs, in `locate`'s order: every one of `files`, those of
    `optional` the repo has, then the first of `weights` it has, with the shards its index (`index(name,
    got)`: the index file's path) names. `get` returns None for a file the repo does not have."""
    found = {name: get(name, True) for name in files.files}
    for name in files.optional:
        got = get(name, False)
        if got is not None:
            found[name] = got
    for name in files.weights:  # the first the repo has
        got = get(name, False)
        if got is not None:
            found[name] = got
            if name.endswith(".index.json"):
                for shard in sorted(set(json.loads(index(name, got).read_text())["weight_map"].values())):
                    found[shard] = get(shard, True)
            return found
    if files.weights:
        raise WeightsUnavailable(f"Cannot get {files.what}: {files.repo_id} has none of {', '.join(files.weights)}.")
    return found


class _ProgressBar(tqdm):
    """tqdm that also reports a download's bytes, rate and time left to a callback (set per download),
    twice a second (`Transfer` reports). The rate is that of the last few seconds."""

    callback: Progress | None = None
    label = ""
    WINDOW_S = 5.0

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        now = time.monotonic()
        if not hasattr(self, "_seen"):
            self._seen: collections.deque[tuple[float, float]] = collections.deque([(self.start_t_monotonic(), 0.0)])
        seen = self._seen
        first = len(seen) == 1  # the first bytes are reported at once, then twice a second
        if self.callback and self.total and (first or now - seen[-1][0] >= 0.5 or self.n >= self.total):
            seen.append((now, self.n))
            while len(seen) > 2 and now - seen[1][0] >= self.WINDOW_S:
                seen.popleft()
            (then, before) = seen[0]
            rate = (self.n - before) / (now - then) if now > then else None
            self.callback(transfer(self.label, int(self.n), int(self.total), rate))
        return shown

    def start_t_monotonic(self) -> float:
        """When this download started, on the monotonic clock."""
        return time.monotonic() - (self._time() - self.start_t)


def transfer(label: str, done: int, total: int, rate: float | None) -> Transfer:
    """The report of a download: "LABEL: 1.0 GB of 5.3 GB (20%), 98 MB/s, about 44 seconds left"."""
    text = f"{label}: {describe_bytes(done)} of {describe_bytes(total)} ({100 * done / total:.0f}%)"
    left = (total - done) / rate if rate and done < total else None
    if rate:
        text += f", {describe_bytes(rate)}/s"
    if left is not None and left >= 1:  # a second or less: nothing worth saying
        text += f", about {describe_seconds(left)} left"
    return Transfer(text, done, total, rate, left)


class _Fetcher:
    """One model's files: from the cache, else downloaded with progress; the Hub is probed once,
    without retries, before the first download (`size` alone asks it about each file, downloading none)."""

    def __init__(self, files: RepoFiles, progress: Progress | None, local_only: bool, refresh: bool = False) -> None:
        self.files = files
        self.progress = progress
        self.local_only = local_only
        self.refresh = refresh and not local_only
        self.probed = False

    def _cached(self, name: str) -> str | object | None:
        """The cached file's path, `_CACHED_NO_EXIST` (known absent), or None (not known here)."""
        files = self.files
        return try_to_load_from_cache(files.repo_id, name, revision=files.revision, repo_type=files.repo_type)

    def get(self, name: str, required: bool = False) -> Path | None:
        """The file's path, or None when the repo does not have it (an error when `required`)."""
        files = self.files
        cached = None if self.refresh else self._cached(name)
        if isinstance(cached, str):
            return Path(cached)
        if cached is None:  # not known locally (as opposed to known to be absent)
            if not self.probed:  # fails in seconds if the Hub cannot answer (a download would retry for long)
                self.size(name, required)
                self.probed = True  # a file the repo lacks is still asked for below: the cache then knows it
            label = f"Downloading {files.where(name)}"
            bar = type("Bar", (_ProgressBar,), {"callback": staticmethod(self.progress), "label": label})
            try:
                where = dict(repo_type=files.repo_type, revision=files.revision)
                return Path(hf_hub_download(files.repo_id, name, **where, tqdm_class=bar))
            except EntryNotFoundError as exc:
                if required:
                    raise _unavailable(files, name, exc) from exc
            except (OSError, ValueError) as exc:  # huggingface_hub's errors derive from these
                raise _unavailable(files, name, exc) from exc
        if required:
            raise WeightsUnavailable(f"Cannot get {files.what}: there is no {files.where(name)}.")
        return None

    def size(self, name: str, required: bool = False) -> int | None:
        """The bytes to download for this file (0: cached), asking the Hub (a HEAD request) only when
        the cache does not know it; None when the repo does not have it (an error when `required`)."""
        files = self.files
        cached = None if self.refresh else self._cached(name)
        if isinstance(cached, str):
            return 0
        if cached is None:
            if self.local_only:
                offline = hub_constants.HF_HUB_OFFLINE
                raise self._not_cached(name, "downloads are off (HF_HUB_OFFLINE=1)" if offline else "")
            url = hf_hub_url(files.repo_id, name, repo_type=files.repo_type, revision=files.revision)
            try:
                metadata = get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)
            except EntryNotFoundError as exc:
                if required:
                    raise _unavailable(files, name, exc) from exc
                return None
            except (RepositoryNotFoundError, RevisionNotFoundError) as exc:  # a gated repo's error is one of these
                raise _unavailable(files, name, exc) from exc
            except HfHubHTTPError as exc:
                raise _refused(files, name, url, exc) from exc
            except Exception as exc:  # connection refused, DNS, timeout, proxy: the HTTP client's own errors
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise self._not_cached(name, f"the Hub ({hub_constants.ENDPOINT}) cannot be reached: {reason}") from exc
            if metadata.commit_hash is None:
                raise _not_a_hub(files, name, url, 200)
            return metadata.size or 0
        if required:
            raise WeightsUnavailable(f"Cannot get {files.what}: there is no {files.where(name)}.")
        return None

    def _not_cached(self, name: str, reason: str) -> WeightsUnavailable:
        """`name` is needed, not downloaded, and cannot be downloaded now (`reason`, for the machine's owner)."""
        cache = hub_constants.HF_HUB_CACHE
        return WeightsUnavailable(
            f"Cannot get {self.files.what}: {self.files.where(name)} is not downloaded, and cannot be downloaded now.",
            not_cached=True,
            detail=f"It is not in the local Hugging Face cache ({cache})" + (f" and {reason}" if reason else "") + ".",
        )


def _refused(files: RepoFiles, name: str, url: str, exc: HfHubHTTPError) -> WeightsUnavailable:
    """The Hub (or whatever answers at its address) refused the request, for no reason `_unavailable` knows."""
    status, headers = exc.response.status_code, exc.response.headers
    if status >= 500 or status == 429:
        return WeightsUnavailable(
            f"Cannot get {files.what}: the Hub answered HTTP {status} for {files.where(name)}; try again later.",
            not_cached=True,
            detail=str(exc).strip().splitlines()[0],
        )
    if "X-Error-Code" in headers or "X-Error-Message" in headers:
        reason = headers.get("X-Error-Message") or str(exc).strip().splitlines()[0]
        return WeightsUnavailable(
            f"Cannot get {files.what}: the Hub refused {files.where(name)} (HTTP {status}).", detail=reason
        )
    return _not_a_hub(files, name, url, status)


def _not_a_hub(files: RepoFiles, name: str, url: str, status: int) -> WeightsUnavailable:
    """The endpoint answered, but not as the Hub does (no commit header, or an error without the Hub's
    error headers): a proxy, a firewall's page, or HF_ENDPOINT naming something else."""
    endpoint = hub_constants.ENDPOINT
    return WeightsUnavailable(
        f"Cannot get {files.what}: the model host does not answer as the Hugging Face Hub does "
        f"(HTTP {status} for {files.where(name)}).",
        not_cached=True,
        detail=f"{endpoint} answered HTTP {status} for {url} without the Hub's headers: is HF_ENDPOINT ({endpoint}) "
        "a Hugging Face Hub, or a mirror of one? A proxy or a firewall can answer this way too.",
    )


def _unavailable(files: RepoFiles, name: str, exc: Exception) -> WeightsUnavailable:
    """What the Hub said, for people, with the fix: in the message where the user can make it (a repo
    they named), else as the detail, for the machine's owner (the registry, a login)."""
    repo, where = files.repo_id, files.where(name)
    yours = files.named == YOU_GAVE
    if isinstance(exc, GatedRepoError):
        problem, fix = f"the repository {repo} is gated", f"accept its terms on https://huggingface.co/{repo}, then "
        fix, yours = fix + "log in here (`hf auth login`)", False
    elif isinstance(exc, RepositoryNotFoundError):
        problem, fix = f"the repository {repo} does not exist or is private", f"check the id {files.named}"
    elif isinstance(exc, RevisionNotFoundError):
        problem, fix = f"{repo} has no revision {files.revision!r}", f"check the revision {files.named}"
    elif isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        problem, fix = f"there is no {where}", f"check the repo id {files.named}"
    elif isinstance(exc, LocalEntryNotFoundError):  # the Hub did not answer the download's own request
        reason = str(exc.__cause__ or exc).splitlines()[0]
        return WeightsUnavailable(
            f"Cannot get {files.what}: {where} is not downloaded, and cannot be downloaded now.",
            not_cached=True,
            detail=f"The Hub ({hub_constants.ENDPOINT}) did not answer: {reason}",
        )
    else:
        problem, fix, yours = f"downloading {where} failed", str(exc).splitlines()[0] if str(exc) else repr(exc), False
    if yours:
        return WeightsUnavailable(f"Cannot get {files.what}: {problem} ({fix}).")
    return WeightsUnavailable(f"Cannot get {files.what}: {problem}.", detail=fix[:1].upper() + fix[1:] + ".")


def fetch(source: AdapterSource, progress: Progress | None = None, task_id: str = "") -> Path:
    """The adapter's local path: a local file/folder as is, or a Hub file through the cache."""
    files = adapter_files(source, task_id)
    if files is None:
        path = Path(source.filename)
        if not path.exists():
            raise WeightsUnavailable(f"Adapter file {path} does not exist.")
        return path
    return locate(files, progress)[source.filename]


@dataclass(frozen=True)
class Remote:
    """What the Hub says of one file now: the commit its revision points at, and its size in bytes."""

    commit: str
    size: int | None


def remote(files: RepoFiles, name: str) -> Remote | None:
    """The Hub's answer for `name` of `files` (one HEAD request), or None where it cannot be asked
    (offline, unreachable): then the cached copy stands. A missing repo or file is an error."""
    if hub_constants.HF_HUB_OFFLINE:
        return None
    url = hf_hub_url(files.repo_id, name, repo_type=files.repo_type, revision=files.revision)
    try:
        metadata = get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise _unavailable(files, name, exc) from exc
    except Exception:  # connection refused, DNS, timeout, another HTTP error: ask again later
        return None
    return Remote(metadata.commit_hash or "", metadata.size) if metadata.commit_hash else None


def fetch_and_read(
    source: AdapterSource, read: Callable[[Path], T], progress: Progress | None = None, task_id: str = ""
) -> T:
    """`read(path)` of the adapter's local path (`fetch`). A refusal names a Hub file by its repo and name,
    not by where this machine's cache keeps it (that path goes to the error's detail)."""
    path = fetch(source, progress, task_id)
    try:
        return read(path)
    except UserError as exc:
        if not source.repo_id:  # a local file: its path is the name its owner gave it
            raise
        named = str(exc).replace(str(path), adapter_files(source, task_id).where(source.filename))
        raise type(exc)(named, detail=f"{path}: {exc}") from exc


def is_cached(files: RepoFiles | AdapterSource | None) -> bool:
    """Whether everything `files` names is in the local cache (an adapter source: its file)."""
    if isinstance(files, AdapterSource):
        if not files.repo_id:
            return Path(files.filename).exists()
        files = adapter_files(files)
    try:
        return files is None or bool(locate(files, local_only=True))
    except WeightsUnavailable:
        return False


def cached_parts(task: Task | TaskRefs) -> dict[str, bool]:
    """Whether each part of a task ("adapter", "lm", "encoder") has its files in the local cache (or, for
    the optional ones, known to be absent from its repo): what `python -m epalm download` fetches."""
    return {
        "adapter": is_cached(task.adapter),
        "lm": is_cached(lm_files(task.lm)),
        "encoder": is_cached(encoder_files(task.encoder, task.modality)),
    }


REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_repo_id(source: str) -> bool:
    """Whether `source` is a Hub repo id (user/name) that the Hub accepts."""
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return bool(REPO_ID.fullmatch(source))

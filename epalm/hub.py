"""Files from the Hugging Face Hub: what each model needs (`RepoFiles`) and where it is locally.

Everything goes through huggingface_hub (pinned revisions, the standard cache under HF_HOME,
HF_HUB_OFFLINE honoured). Each model's files are named once (`lm_files`, `encoder_files`,
`adapter_files`): exactly what its loader reads, which `python -m epalm download` prefetches and
`python -m epalm tasks` checks. A model whose files are all cached loads without any request (a
branch such as `main` is not re-checked for updates: `download` does that).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import timm
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

from .errors import Progress, WeightsUnavailable
from .media import describe_bytes
from .tasks import AdapterSource, EncoderRef, ModelRef, Task

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
    named: str = "in checkpoints/tasks.yaml"  # where the repo id was given, for the messages' hints

    def where(self, filename: str) -> str:
        repo = f"the Space {self.repo_id}" if self.repo_type == "space" else self.repo_id
        return f"{filename} in {repo}" + (f" (revision {self.revision})" if self.revision != "main" else "")


def lm_files(ref: ModelRef) -> RepoFiles:
    """An OPT LM: its config, tokenizer files and weights (what `from_pretrained` reads, nothing else)."""
    what = f"the language model {ref.id}"
    return RepoFiles(what, ref.id, ref.revision, files=("config.json",), optional=TOKENIZER_FILES, weights=WEIGHT_FILES)


def encoder_files(ref: EncoderRef, modality: str) -> RepoFiles:
    """A timm encoder needs only its weights (timm builds the model from its name); a transformers
    encoder, its config and weights."""
    what = f"the {modality} encoder {ref.id}"
    if ref.library != "timm":
        return RepoFiles(what, ref.id, ref.revision, files=("config.json",), weights=WEIGHT_FILES)
    pretrained = timm.models.get_pretrained_cfg(ref.id)
    repo = pretrained.hf_hub_id if pretrained is not None and pretrained.hf_hub_id else f"timm/{ref.id}"
    return RepoFiles(what, repo, ref.revision, weights=TIMM_WEIGHT_FILES)


def adapter_files(source: AdapterSource, task_id: str = "") -> RepoFiles | None:
    """The adapter's file on the Hub (None for a local adapter)."""
    if not source.repo_id:
        return None
    what = f"the adapter of {task_id}" if task_id else "the adapter"
    return RepoFiles(what, source.repo_id, source.revision, source.repo_type, files=(source.filename,))


def task_files(task: Task) -> dict[str, RepoFiles | None]:
    """Everything a task needs from the Hub, by part ("adapter", "lm", "encoder")."""
    return {
        "adapter": adapter_files(task.adapter, task.id),
        "lm": lm_files(task.lm),
        "encoder": encoder_files(task.encoder, task.modality),
    }


def locate(files: RepoFiles, progress: Progress | None = None, local_only: bool = False) -> dict[str, Path]:
    """Local paths of the files a model needs, from the cache or downloaded once (never with
    `local_only` or HF_HUB_OFFLINE=1). An unreachable Hub fails at the first missing file, in seconds."""
    fetcher = _Fetcher(files, progress, local_only or hub_constants.HF_HUB_OFFLINE)
    found = {name: fetcher.get(name, required=True) for name in files.files}
    for name in files.optional:
        path = fetcher.get(name)
        if path is not None:
            found[name] = path
    for name in files.weights:  # the first the repo has
        path = fetcher.get(name)
        if path is not None:
            found[name] = path
            if name.endswith(".index.json"):
                for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
                    found[shard] = fetcher.get(shard, required=True)
            return found
    if files.weights:
        raise WeightsUnavailable(f"Cannot get {files.what}: {files.repo_id} has none of {', '.join(files.weights)}.")
    return found


class _ProgressBar(tqdm):
    """tqdm that also reports a download's bytes to a callback (set per download), twice a second."""

    callback: Progress | None = None
    label = ""
    _reported = 0.0

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        now = time.monotonic()
        if self.callback and self.total and (now - self._reported >= 0.5 or self.n >= self.total):
            self._reported = now
            done = f"{describe_bytes(self.n)} of {describe_bytes(self.total)} ({100 * self.n / self.total:.0f}%)"
            self.callback(f"{self.label}: {done}")
        return shown


class _Fetcher:
    """One model's files: from the cache, else downloaded with progress; the Hub is probed once,
    without retries, before the first download."""

    def __init__(self, files: RepoFiles, progress: Progress | None, local_only: bool) -> None:
        self.files = files
        self.progress = progress
        self.local_only = local_only
        self.probed = False

    def get(self, name: str, required: bool = False) -> Path | None:
        """The file's path, or None when the repo does not have it (an error when `required`)."""
        files = self.files
        cached = try_to_load_from_cache(files.repo_id, name, revision=files.revision, repo_type=files.repo_type)
        if isinstance(cached, str):
            return Path(cached)
        if cached is None:  # not known locally (as opposed to known to be absent)
            if self.local_only:
                offline = hub_constants.HF_HUB_OFFLINE
                raise self._not_cached(name, "downloads are off (HF_HUB_OFFLINE=1)" if offline else "")
            self._probe(name)
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

    def _probe(self, name: str) -> None:
        """Fail in seconds when the Hub cannot be reached (a download would retry for half a minute)."""
        if self.probed:
            return
        self.probed = True
        url = hf_hub_url(self.files.repo_id, name, repo_type=self.files.repo_type, revision=self.files.revision)
        try:
            get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)
        except (EntryNotFoundError, HfHubHTTPError):
            return  # the Hub answered: the download reports what it said
        except Exception as exc:  # connection refused, DNS, timeout, proxy: the HTTP client's own errors
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise self._not_cached(name, f"the Hub ({hub_constants.ENDPOINT}) cannot be reached: {reason}") from exc

    def _not_cached(self, name: str, reason: str) -> WeightsUnavailable:
        cache = hub_constants.HF_HUB_CACHE
        return WeightsUnavailable(
            f"Cannot get {self.files.what}: {self.files.where(name)} is not in the local Hugging Face cache ({cache})"
            + (f" and {reason}" if reason else "")
            + ".",
            not_cached=True,
        )


def _unavailable(files: RepoFiles, name: str, exc: Exception) -> WeightsUnavailable:
    repo = files.repo_id
    if isinstance(exc, GatedRepoError):
        hint = f"the repository is gated: accept its terms on https://huggingface.co/{repo}, then `hf auth login`"
    elif isinstance(exc, RepositoryNotFoundError):
        hint = f"the repository {repo} does not exist or is private (check the id {files.named}, or log in)"
    elif isinstance(exc, RevisionNotFoundError):
        hint = f"{repo} has no revision {files.revision!r} (check the revision {files.named})"
    elif isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        hint = f"there is no {files.where(name)} (check the repo id {files.named})"
    else:
        hint = f"downloading {files.where(name)} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return WeightsUnavailable(f"Cannot get {files.what}: {hint}.", not_cached=isinstance(exc, LocalEntryNotFoundError))


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


REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_repo_id(source: str) -> bool:
    """Whether `source` is a Hub repo id (user/name) that the Hub accepts."""
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return bool(REPO_ID.fullmatch(source))

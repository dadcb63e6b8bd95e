"""Weights from the Hugging Face Hub: adapters (original `.pth` or our safetensors format), the
base LMs and encoders, and the conversion between adapter formats.

Everything goes through huggingface_hub (pinned revisions, the standard cache under HF_HOME,
HF_HUB_OFFLINE honoured). Each model's files are named once (`lm_files`, `encoder_files`,
`adapter_files`): exactly what its loader reads, which `python -m epalm download` prefetches and
`python -m epalm tasks` checks. A model whose files are all cached loads without any request (a
branch such as `main` is not re-checked for updates: `download` does that); the models then load
from the local snapshot folder. Pickles are read with `weights_only=True` only: a checkpoint that
tries to run code is refused, never executed.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import pickle
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import transformers
from huggingface_hub import HfApi, get_hf_file_metadata, get_token, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub import constants as hub_constants
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
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM, PreTrainedTokenizerBase

from .encoders import Encoder, attention_kernel, wrap_encoder
from .errors import UserError
from .media import describe_bytes
from .model import Adapter
from .tasks import ADAPTER_CONFIG, TASK_GENERATION_KEYS, AdapterSource, EncoderRef, ModelRef, Task

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FILES = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, "README.md"]  # an adapter folder, as uploaded
_ADAPTER_PREFIXES = ("connector.", "prompt_module.")
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


class WeightsUnavailable(UserError, RuntimeError):
    """A file or model could not be had (offline, missing, gated); the message says what to do.
    `not_cached`: a download was needed and could not happen (offline, or the Hub unreachable)."""

    def __init__(self, message: str, not_cached: bool = False) -> None:
        super().__init__(message)
        self.not_cached = not_cached


class AdapterError(UserError, ValueError):
    """An adapter file is unsafe, unreadable, or does not fit the task's models."""


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


def read_adapter(path: str | Path) -> dict[str, torch.Tensor]:
    """Adapter tensors from an original checkpoint (`{'model': state, 'optimizer': ...}`) or from
    our format (a folder, or the `adapter.safetensors` file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_WEIGHTS
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as exc:
            raise AdapterError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_globals(path, exc)
        if not refused:
            raise AdapterError(f"{path} is not a readable PyTorch checkpoint (truncated or not a checkpoint).") from exc
        raise AdapterError(
            f"Refused to load {path.name}: it asks to run Python code ({', '.join(refused)}) when unpickled. Only "
            f"checkpoints holding tensors and plain data are loaded."
        ) from exc
    except Exception as exc:
        raise AdapterError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise AdapterError(f"{path}: expected a dict with a 'model' state dict")
    return {k: v for k, v in state.items() if k.startswith(_ADAPTER_PREFIXES) and isinstance(v, torch.Tensor)}


def _numpy_scalar_globals() -> list:
    """numpy scalars (a real checkpoint's `best_valid` score) are plain data: allow just those, under
    the module names of numpy 2 and of numpy 1 (`numpy.core`), which pickled the authors' checkpoints."""
    from numpy._core.multiarray import scalar

    dtypes = [type(np.dtype(code)) for code in "?bhilqBHILQefdg"]
    return [
        np.dtype,
        *((cls, f"numpy.dtypes.{cls.__name__}") for cls in dtypes),
        *((scalar, f"{module}.multiarray.scalar") for module in ("numpy._core", "numpy.core")),
    ]


_NUMPY_GLOBALS = _numpy_scalar_globals()


def _refused_globals(path: Path, exc: pickle.UnpicklingError) -> list[str]:
    """Every global a refused checkpoint names (torch's error names only the first it met)."""
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint (legacy format or garbage): fall back on the message
        found = []
    return found or re.findall(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", str(exc))


def load_adapter(
    task: Task, state: dict[str, torch.Tensor], encoder_dim: int, hidden_size: int, embed_dim: int
) -> Adapter:
    """An fp32 `Adapter` for `task`, loaded strictly; a mismatch names the task, key and shapes."""
    adapter = Adapter(task.injection, encoder_dim, hidden_size, embed_dim)
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"Adapter for task '{task.id}' does not match its settings: missing keys {missing or 'none'}, "
            f"unexpected keys {unexpected or 'none'} (check shared_connector / prompt_mlp / num_features)."
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise AdapterError(
                f"Adapter for task '{task.id}': {key} has shape {tuple(state[key].shape)}, but the task's models "
                f"need {tuple(tensor.shape)} (is the LM or encoder in the registry the one it was trained with?)."
            )
    adapter.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return adapter.eval().requires_grad_(False)


def adapter_config(task: Task) -> dict:
    """The model settings stored next to converted weights (enough to rebuild the task)."""
    return {
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
    }


def convert(src: str | Path, task: Task, out_dir: str | Path) -> Path:
    """Write `adapter.safetensors`, `adapter_config.json` and a model card for an original checkpoint."""
    state = read_adapter(src)
    return save_adapter(
        state, adapter_config(task), _model_card(task, Path(src).name, sum(v.numel() for v in state.values())), out_dir
    )


def save_adapter(state: dict[str, torch.Tensor], config: dict, card: str, out_dir: str | Path) -> Path:
    """Write our adapter folder: `adapter.safetensors`, `adapter_config.json` and the model card."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt", "task": config["task"]})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (out / "README.md").write_text(card)
    return out


def _model_card(task: Task, source: str, parameters: int) -> str:
    origin = f"{task.adapter.repo_id} ({task.adapter.filename})" if task.adapter.repo_id else source
    summary = (
        f'Connector and soft prompt ({parameters:,} parameters) of eP-ALM ("Efficient Perceptual Augmentation of\n'
        f'Language Models", ICCV 2023) for the task `{task.id}`.'
    )
    return (
        model_card_head(task, task.title, summary)
        + f"""- Converted from: {origin}, tensors unchanged (`adapter.safetensors`), settings in `adapter_config.json`.

Licence: the weights are the eP-ALM authors' (github.com/mshukor/eP-ALM); use them under the terms they
were released with, and those of the base models.
"""
    )


def model_card_head(task: Task, title: str, summary: str) -> str:
    """The start of an adapter folder's README.md (a Hub model card), converted or trained: the front
    matter, the title, `summary`, and the frozen models and injection the adapter is for."""
    inj = task.injection
    connectors = "one shared connector" if inj.shared_connector else "one connector per block"
    prompt = f"{inj.prompt_len}-token prompt" + (" with MLP" if inj.prompt_mlp else "")
    return f"""---
library_name: epalm-demo
tags: [eP-ALM, multimodal, {task.modality}, {task.kind}]
base_model: [{task.lm.id}]
---
# eP-ALM adapter: {title}

{summary}

- Language model (frozen): `{task.lm.id}`
- Encoder (frozen): `{task.encoder.id}` ({task.encoder.library})
- Injection: layers {inj.start_layer}..{inj.end_layer - 1}, last {inj.num_features} encoder blocks,
  {connectors}, {prompt}
"""


REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_repo_id(source: str) -> bool:
    """Whether `source` is a Hub repo id (user/name) that the Hub accepts."""
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return bool(REPO_ID.fullmatch(source))


def check_push(repo_id: str) -> None:
    """Refuse an upload that cannot be made before any work for it (a training run): a repo id the
    adapter could not be used back from, or no token (the Hub takes no anonymous uploads)."""
    if not is_repo_id(repo_id):
        raise UserError(f"Cannot upload to {repo_id!r}: give a Hub repo id (user/name), as --adapter will take it.")
    if get_token() is None:
        raise WeightsUnavailable(
            f"Uploading to {repo_id} needs a Hugging Face token with write access: "
            "log in with `hf auth login` (or set HF_TOKEN)."
        )


def push_to_hub(folder: str | Path, repo_id: str, allow_patterns: list[str] | None = None) -> str:
    """Upload an adapter folder to a model repo (created if need be); returns the repo's URL. Only
    the files matching `allow_patterns` go, by default the adapter's own (`ADAPTER_FILES`): never
    whatever else the folder holds."""
    check_push(repo_id)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message="Add eP-ALM adapter",
            allow_patterns=allow_patterns or ADAPTER_FILES,
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        said = f"the Hub answered {status} ({exc.server_message or str(exc).splitlines()[0]})"
        login = "; log in with `hf auth login`, with a token that may write to it" if status in (401, 403) else ""
        raise WeightsUnavailable(f"Cannot upload to {repo_id}: {said}{login}.") from exc
    except ValueError as exc:  # a model card the Hub refuses, a folder that is not there
        raise WeightsUnavailable(f"Cannot upload to {repo_id}: {exc}") from exc
    except Exception as exc:  # connection refused, DNS, timeout, offline mode: the HTTP client's own errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsUnavailable(
            f"Cannot upload to {repo_id}: the Hub ({hub_constants.ENDPOINT}) cannot be reached: {reason}."
        ) from exc
    return str(url)


class HubModels:
    """The real pretrained models (a `store.ModelSource`), each from the Hub cache (downloading once)."""

    random_weights = False

    def tasks(self, registry: dict[str, Task]) -> dict[str, Task]:
        return dict(registry)

    def lm(
        self, ref: ModelRef, dtype: torch.dtype, progress: Progress | None = None
    ) -> tuple[OPTForCausalLM, PreTrainedTokenizerBase]:
        found = locate(lm_files(ref), progress)
        weights = [path for name, path in found.items() if name.endswith((".bin", ".safetensors"))]
        return load_lm(ref.id, found["config.json"].parent, weights, dtype, progress)  # the snapshot folder holds all

    def encoder(self, ref: EncoderRef, modality: str, dtype: torch.dtype, progress: Progress | None = None) -> Encoder:
        found = locate(encoder_files(ref, modality), progress)
        overrides = dict(ref.config)
        _say(progress, f"Building the {modality} encoder {ref.id}…")
        try:
            if ref.library == "timm":
                (weights,) = found.values()
                model = timm.create_model(
                    ref.id, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, num_classes=0, **overrides
                )
            else:
                folder = found["config.json"].parent
                config = transformers.AutoConfig.from_pretrained(folder, **overrides)
                model_class = _checkpoint_class(config, modality)
                model = model_class.from_pretrained(
                    folder, config=config, attn_implementation=attention_kernel(model_class)
                ).base_model
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
            raise WeightsUnavailable(f"Cannot load the {modality} encoder {ref.id}: {exc}") from exc
        return wrap_encoder(model.to(dtype))

    def adapter_state(self, task: Task, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        return read_adapter(fetch(task.adapter, progress, task.id))

    def cached(self, task: Task) -> dict[str, bool]:
        """Whether each file a task needs is already in the local cache (or known to be absent
        from its repo, for the optional ones): what `python -m epalm download` fetches."""
        return {
            "adapter": is_cached(task.adapter),
            "lm": is_cached(lm_files(task.lm)),
            "encoder": is_cached(encoder_files(task.encoder, task.modality)),
        }


def load_lm(
    name: str, folder: Path, weights: list[Path], dtype: torch.dtype, progress: Progress | None = None
) -> tuple[OPTForCausalLM, PreTrainedTokenizerBase]:
    """An OPT LM in `dtype` and its tokenizer, from a folder holding its config and tokenizer files
    and the given weight files. Nothing is downloaded, so transformers never starts its background
    safetensors conversion (which would fetch a second copy of the weights from the Hub)."""
    _say(progress, f"Reading the weights of {name} ({describe_bytes(sum(path.stat().st_size for path in weights))})")
    try:
        config = OPTConfig.from_pretrained(folder)
        state = read_weights(weights, dtype)
        lm = OPTForCausalLM.from_pretrained(
            None, config=config, state_dict=state, dtype=dtype, attn_implementation="eager"
        )  # the state's tensors become the parameters: no second copy
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise WeightsUnavailable(f"Cannot load the language model {name} from {folder}: {exc}") from exc
    return lm, tokenizer  # the store adds the registry's answer tokens (`</a>`)


_ENCODER_CLASSES = {
    "video": (transformers.TimesformerModel, transformers.TimesformerForVideoClassification),
    "audio": (transformers.ASTModel, transformers.ASTForAudioClassification),
}


def _checkpoint_class(config: transformers.PretrainedConfig, modality: str) -> type[transformers.PreTrainedModel]:
    """The class the checkpoint was saved from (the released encoders are classifiers): loading
    that one and keeping its `base_model` matches every key, so transformers has nothing to report."""
    base, classifier = _ENCODER_CLASSES[modality]
    return classifier if classifier.__name__ in (config.architectures or ()) else base


def read_weights(paths: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors in `dtype`, cast tensor by tensor straight from the file's pages.

    A `.bin` is memory-mapped (torch.load's mmap) rather than first copied into memory whole, which
    halves the read (bench/RESULTS.md, cold start). Each tensor's pages are handed back to the kernel
    as soon as its copy exists (`_release`), so the peak stays the model in `dtype` plus one tensor,
    not plus the whole checkpoint. Where that cannot be done (no madvise: Windows), the file is read
    into memory instead, with the same peak. Every tensor is copied out: none stays backed by the file."""
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        part, release = _open_weights(path)
        for key in list(part):
            original = part.pop(key)
            state[key] = original.to(dtype, copy=True)
            if release is not None:
                release(original)
    return state


def _open_weights(path: Path) -> tuple[dict[str, torch.Tensor], Callable[[torch.Tensor], None] | None]:
    """A weight file's tensors, and how to release a mapped tensor's pages (None: they are in memory)."""
    if path.suffix == ".safetensors":
        return load_file(path), None
    release = _page_release()
    if release is not None:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), release
        except RuntimeError:  # a file in torch's legacy (pre-zip) format cannot be mapped
            pass
    return torch.load(path, map_location="cpu", weights_only=True), None


_MADV_DONTNEED = 4  # the same on Linux and macOS


def _page_release() -> Callable[[torch.Tensor], None] | None:
    """A function that drops a memory-mapped tensor's pages from this process (madvise DONTNEED; the
    mapping is private and never written, so a page touched again is read again from the file)."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):  # no C library symbols to look up (Windows)
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE

    def release(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        start = storage.data_ptr() // page * page
        end = -(-(storage.data_ptr() + storage.nbytes()) // page) * page
        madvise(start, end - start, _MADV_DONTNEED)  # advice: a failure only leaves the pages resident

    return release


def _say(progress: Progress | None, message: str) -> None:
    log.info(message)
    if progress is not None:
        progress(message)

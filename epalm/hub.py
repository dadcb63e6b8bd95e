"""Weights from the Hugging Face Hub: adapters (original `.pth` or our safetensors format), the
base LMs and encoders, and the conversion between adapter formats.

Everything goes through huggingface_hub (pinned revisions, the standard cache under HF_HOME,
HF_HUB_OFFLINE honoured). Pickles are read with `weights_only=True` only: a checkpoint that
tries to run code is refused, never executed.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
import transformers
from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, OPTForCausalLM, PreTrainedTokenizerBase

from .encoders import Encoder, wrap_encoder
from .errors import UserError
from .model import Adapter
from .tasks import AdapterSource, EncoderRef, ModelRef, Task

Progress = Callable[[str], None]
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_PREFIXES = ("connector.", "prompt_module.")


class WeightsUnavailable(UserError, RuntimeError):
    """A file or model could not be had (offline, missing, gated); the message says what to do."""


class AdapterError(UserError, ValueError):
    """An adapter file is unsafe, unreadable, or does not fit the task's models."""


def _unavailable(what: str, repo: str, exc: Exception) -> WeightsUnavailable:
    if isinstance(exc, LocalEntryNotFoundError) or "offline" in str(exc).lower() or "couldn't connect" in str(exc).lower():
        hint = (
            f"it is not in the local Hugging Face cache and the Hub cannot be reached (offline, or HF_HUB_OFFLINE=1). "
            f"Run once with network access to download it, e.g. `hf download {repo}`"
        )
    elif isinstance(exc, GatedRepoError):
        hint = f"the repository is gated: accept its terms on https://huggingface.co/{repo} and log in with `hf auth login`"
    elif isinstance(exc, RepositoryNotFoundError):
        hint = "the repository does not exist or is private (check the id in checkpoints/tasks.yaml, or log in)"
    elif isinstance(exc, RevisionNotFoundError):
        hint = "the pinned revision does not exist in that repository (check `revision` in checkpoints/tasks.yaml)"
    elif isinstance(exc, EntryNotFoundError):
        hint = "that file is not in the repository at the pinned revision (check `filename` in checkpoints/tasks.yaml)"
    else:
        hint = str(exc)
    return WeightsUnavailable(f"Cannot get {what} from {repo}: {hint}.")


class _ProgressBar(tqdm):
    """tqdm that also reports download progress to a callback (set per download)."""

    callback: Progress | None = None
    label = ""

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        if self.callback and self.total:
            self.callback(f"{self.label}: {self.n / 2**20:.0f} / {self.total / 2**20:.0f} MB")
        return shown


def fetch(source: AdapterSource, progress: Progress | None = None) -> Path:
    """The adapter's local path: a local file/folder as is, or a Hub file through the cache."""
    if not source.repo_id:
        path = Path(source.filename)
        if not path.exists():
            raise WeightsUnavailable(f"Adapter file {path} does not exist.")
        return path
    bar = type("Bar", (_ProgressBar,), {"callback": staticmethod(progress) if progress else None, "label": source.filename})
    try:
        return Path(
            hf_hub_download(
                source.repo_id, source.filename, repo_type=source.repo_type, revision=source.revision, tqdm_class=bar
            )
        )
    except (OSError, ValueError) as exc:  # huggingface_hub errors derive from these
        raise _unavailable(f"the adapter file '{source.filename}'", source.repo_id, exc) from exc


def is_cached(source: AdapterSource) -> bool:
    if not source.repo_id:
        return Path(source.filename).exists()
    found = try_to_load_from_cache(source.repo_id, source.filename, revision=source.revision, repo_type=source.repo_type)
    return isinstance(found, str)


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
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if found is None:
            raise AdapterError(f"{path} is not a readable PyTorch checkpoint (truncated or not a checkpoint).") from exc
        raise AdapterError(
            f"Refused to load {path.name}: it asks to run Python code ({found.group(1)}) when unpickled. Only "
            f"checkpoints holding tensors and plain data are loaded."
        ) from exc
    except Exception as exc:
        raise AdapterError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise AdapterError(f"{path}: expected a dict with a 'model' state dict")
    return {k: v for k, v in state.items() if k.startswith(_ADAPTER_PREFIXES) and isinstance(v, torch.Tensor)}


def _numpy_scalar_globals() -> list:
    """numpy scalars (a real checkpoint's `best_valid` score) are plain data: allow just those."""
    found = [np.dtype, type(np.dtype("float64")), type(np.dtype("float32")), type(np.dtype("int64"))]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return found + [scalar]


def load_adapter(task: Task, state: dict[str, torch.Tensor], encoder_dim: int, hidden_size: int, embed_dim: int) -> Adapter:
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
        "modality": task.modality,
        "kind": task.kind,
        "lm": asdict(task.lm),
        "encoder": {**asdict(task.encoder), "config": dict(task.encoder.config)},
        "preprocess": asdict(task.preprocess),
        "injection": asdict(task.injection),
        "text": asdict(task.text),
        "generation": {"num_beams": task.generation.num_beams, "max_length": task.generation.max_length},
    }


def convert(src: str | Path, task: Task, out_dir: str | Path) -> Path:
    """Write `adapter.safetensors`, `adapter_config.json` and a model card for an original checkpoint."""
    state = read_adapter(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out / ADAPTER_WEIGHTS, metadata={"format": "pt", "task": task.id})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(task), indent=2) + "\n")
    (out / "README.md").write_text(_model_card(task, Path(src).name, sum(v.numel() for v in state.values())))
    return out


def _model_card(task: Task, source: str, parameters: int) -> str:
    origin = f"{task.adapter.repo_id} ({task.adapter.filename})" if task.adapter.repo_id else source
    return f"""---
library_name: epalm-demo
tags: [eP-ALM, multimodal, {task.modality}, {task.kind}]
base_model: [{task.lm.id}]
---
# eP-ALM adapter: {task.title}

Connector and soft prompt ({parameters:,} parameters) of eP-ALM ("Efficient Perceptual Augmentation of
Language Models", ICCV 2023) for the task `{task.id}`.

- Language model (frozen): `{task.lm.id}`
- Encoder (frozen): `{task.encoder.id}` ({task.encoder.library})
- Injection: layers {task.injection.start_layer}..{task.injection.end_layer - 1}, last {task.injection.num_features} encoder blocks,
  {"one shared connector" if task.injection.shared_connector else "one connector per block"}, {task.injection.prompt_len}-token prompt{" with MLP" if task.injection.prompt_mlp else ""}
- Converted from: {origin}, tensors unchanged (`adapter.safetensors`), settings in `adapter_config.json`.

Licence: the weights are the eP-ALM authors' (github.com/mshukor/eP-ALM); use them under the terms they
were released with, and those of the base models.
"""


def push_to_hub(folder: str | Path, repo_id: str) -> str:
    """Upload a converted adapter folder; returns the repo URL."""
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Add eP-ALM adapter")
    except (OSError, ValueError) as exc:
        raise _unavailable("an upload", repo_id, exc) from exc
    return f"https://huggingface.co/{repo_id}"


class HubModels:
    """The real pretrained models (a `store.ModelSource`), each from the Hub cache (downloading once)."""

    random_weights = False

    def tasks(self, registry: dict[str, Task]) -> dict[str, Task]:
        return dict(registry)

    def lm(self, ref: ModelRef, dtype: torch.dtype) -> tuple[OPTForCausalLM, PreTrainedTokenizerBase]:
        try:
            lm = OPTForCausalLM.from_pretrained(ref.id, revision=ref.revision, dtype=dtype, attn_implementation="eager")
            tokenizer = AutoTokenizer.from_pretrained(ref.id, revision=ref.revision)
        except (OSError, ValueError) as exc:
            raise _unavailable(f"the language model '{ref.id}'", ref.id, exc) from exc
        return lm, tokenizer

    def encoder(self, ref: EncoderRef, modality: str, dtype: torch.dtype) -> Encoder:
        overrides = dict(ref.config)
        try:
            if ref.library == "timm":
                model = timm.create_model(ref.id, pretrained=True, num_classes=0, **overrides)
            else:
                model_class = {"video": transformers.TimesformerModel, "audio": transformers.ASTModel}[modality]
                model = model_class.from_pretrained(ref.id, revision=ref.revision, attn_implementation="eager", **overrides)
        except (OSError, ValueError, RuntimeError) as exc:
            repo = ref.id if ref.library != "timm" else f"timm/{ref.id}"
            raise _unavailable(f"the {modality} encoder '{ref.id}'", repo, exc) from exc
        return wrap_encoder(model.to(dtype))

    def adapter_state(self, task: Task, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        return read_adapter(fetch(task.adapter, progress))

    def cached(self, task: Task) -> dict[str, bool]:
        """Whether each file a task needs is already in the local cache."""
        timm_repo = f"timm/{task.encoder.id}" if task.encoder.library == "timm" else task.encoder.id
        return {
            "adapter": is_cached(task.adapter),
            "lm": is_cached(AdapterSource("config.json", task.lm.id, revision=task.lm.revision)),
            "encoder": is_cached(AdapterSource("config.json", timm_repo, revision=task.encoder.revision)),
        }

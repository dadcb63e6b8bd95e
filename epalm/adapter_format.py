"""The adapter's files: the authors' `.pth` checkpoints (read without running their pickles), our
folder format (`adapter.safetensors` + `adapter_config.json` + a model card), and the conversion
from one to the other.

Pickles are read with `weights_only=True` only: a checkpoint that tries to run code is refused,
never executed.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import AdapterError
from .model import Adapter
from .refs import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .tasks import AdapterConfig, Task

ADAPTER_FILES = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, "README.md"]  # an adapter folder, as uploaded
_ADAPTER_PREFIXES = ("connector.", "prompt_module.")


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


def check_injection(task: Task, layers: int, blocks: int) -> None:
    """Refuse injection settings the models cannot take: layers the LM does not have, more encoder
    blocks than the encoder has."""
    inj = task.injection
    if inj.end_layer > layers:
        raise AdapterError(
            f"The adapter's injection.end_layer is {inj.end_layer}, but {task.lm.display_name} has {layers} layers."
        )
    if inj.num_features > blocks:
        raise AdapterError(
            f"The adapter's injection.num_features is {inj.num_features}, but {task.encoder.display_name} has "
            f"{blocks} blocks."
        )


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
        if not state[key].is_floating_point():
            raise AdapterError(f"Adapter for task '{task.id}': {key} holds {state[key].dtype} values, not numbers.")
        if not torch.isfinite(state[key]).all():  # a diverged training run: every answer would be empty
            raise AdapterError(f"Adapter for task '{task.id}': {key} holds NaN or infinite values.")
    adapter.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return adapter.eval().requires_grad_(False)


def convert(src: str | Path, task: Task, out_dir: str | Path) -> Path:
    """Write `adapter.safetensors`, `adapter_config.json` and a model card for an original checkpoint."""
    state = read_adapter(src)
    card = _model_card(task, Path(src).name, sum(v.numel() for v in state.values()))
    return save_adapter(state, AdapterConfig(task), card, out_dir)


def save_adapter(state: dict[str, torch.Tensor], config: AdapterConfig, card: str, out_dir: str | Path) -> Path:
    """Write our adapter folder: `adapter.safetensors`, `adapter_config.json` and the model card."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt", "task": config.task.id})
    config.write(out)
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

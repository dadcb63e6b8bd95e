"""The adapter's files: the authors' `.pth` checkpoints (read without running their pickles), our
folder format (`adapter.safetensors` + `adapter_config.json` + a model card), and the conversion
from one to the other.

Pickles are read with `weights_only=True` only: a checkpoint that tries to run code is refused,
never executed.
"""

from __future__ import annotations

import pickle
import pickletools
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import AdapterError
from .media import not_a_file
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
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise AdapterError(
                f"{path} is a folder without {ADAPTER_WEIGHTS}: give an original checkpoint (.pth) or an adapter "
                "folder."
            )
        path = path / ADAPTER_WEIGHTS
    _check_file(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as exc:
            raise AdapterError(f"{path} is not a readable safetensors file ({_reason(exc)}).") from exc
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_globals(path, exc)
        if not refused:
            raise AdapterError(f"{path} is not a readable PyTorch checkpoint ({_reason(exc)}).") from exc
        raise AdapterError(
            f"Refused to load {path.name}: it asks to run Python code ({', '.join(refused)}) when unpickled. Only "
            f"checkpoints holding tensors and plain data are loaded."
        ) from exc
    except Exception as exc:
        raise AdapterError(f"{path} is not a readable PyTorch checkpoint ({_reason(exc)}).") from exc
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise AdapterError(f"{path}: expected a dict with a 'model' state dict")
    return {k: v for k, v in state.items() if k.startswith(_ADAPTER_PREFIXES) and isinstance(v, torch.Tensor)}


def _check_file(path: Path) -> None:
    """Refuse what is not a regular file with content before a reader opens it (a device or a pipe would
    be read forever)."""
    if not path.exists():
        raise AdapterError(f"No such file: {path}")
    kind = not_a_file(path)
    if kind:
        raise AdapterError(f"{path} is {kind}, not a checkpoint file.")
    if path.stat().st_size == 0:
        raise AdapterError(f"{path} is empty (0 bytes): not a checkpoint.")


def _reason(exc: BaseException) -> str:
    """A reader's failure in a few words: torch's weights-only error without its advice, else the message,
    else (EOFError and others raised without one) what kind of failure it was."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error: \s*(.+)", text)
    if found:
        return f"truncated, or not a checkpoint: {found.group(1).strip()}"
    if isinstance(exc, EOFError):
        return "it ends too early: truncated"
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__


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
    """Every global a refused checkpoint names (torch's error names only the first it met): torch's
    own list for a zip checkpoint, the pickle's instructions read (not run) for a legacy one."""
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint (legacy format or garbage)
        found = [name for name in _pickle_globals(path) if not _is_data(name)]
    return found or re.findall(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", str(exc))


def _pickle_globals(path: Path) -> list[str]:
    """The globals (`module.name`) that the pickles at the start of a file would import, read with
    pickletools, which only decodes the instructions. A legacy checkpoint is a few pickles in a row,
    then raw tensor data, where reading stops."""
    found: set[str] = set()
    with path.open("rb") as f:
        for _ in range(8):
            strings: list[str] = []  # the strings pushed so far (STACK_GLOBAL takes the last two)
            memo: dict[int, str] = {}
            try:
                for op, arg, _pos in pickletools.genops(f):
                    if isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                        strings.append(str(arg))
                    elif op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT") and strings:
                        memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = strings[-1]
                    elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                        strings.append(memo[int(arg)])
                    elif op.name in ("GLOBAL", "INST"):
                        found.add(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.add(f"{strings[-2]}.{strings[-1]}")
            except Exception:  # the end of the file, or the tensor data after the pickles
                break
    return sorted(found)


def _is_data(name: str) -> bool:
    """A global that torch's weights-only loader takes as data: its tensor and storage types, an
    OrderedDict, the numpy scalar types allowed above."""
    allowed = {"collections.OrderedDict"} | {
        g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__name__}" for g in _NUMPY_GLOBALS
    }
    return name.split(".")[0] == "torch" or name in allowed


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


# The widths and depths of the registry's models, from their configs: the Hub repos' config.json (OPT:
# hidden_size, word_embed_proj_dim, num_hidden_layers; TimeSformer and AST: hidden_size, num_hidden_layers) and
# timm's definitions of vit_base/large_patch16_224 (embed_dim, depth). `convert` checks a checkpoint against
# them without downloading the models; for other models it checks the checkpoint against itself.
LM_SHAPES = {  # id: (hidden_size, word_embed_proj_dim, layers)
    "facebook/opt-2.7b": (2560, 2560, 32),
    "facebook/opt-6.7b": (4096, 4096, 32),
}
ENCODER_SHAPES = {  # id: (width, blocks)
    "vit_base_patch16_224.augreg_in21k_ft_in1k": (768, 12),
    "vit_large_patch16_224.augreg_in21k_ft_in1k": (1024, 24),
    "facebook/timesformer-base-finetuned-k600": (768, 12),
    "MIT/ast-finetuned-audioset-10-10-0.4593": (768, 12),
}


def check_fits(task: Task, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse tensors that are not an adapter for `task` (`source` names them): the keys its injection
    gives, the shapes its models' widths give (the registry's models: `LM_SHAPES`, `ENCODER_SHAPES`;
    others: the checkpoint's own widths, the same in every tensor), finite floating-point numbers."""
    if not state:
        raise AdapterError(
            f"{source} holds no adapter tensors (connector.*, prompt_module.*): it is not an eP-ALM adapter checkpoint."
        )
    lm, encoder = LM_SHAPES.get(task.lm.id), ENCODER_SHAPES.get(task.encoder.id)
    made_for = _own_widths(state)
    if lm is None or encoder is None:
        load_adapter(task, state, *(width or 1 for width in made_for))  # a missing tensor: its key is named
        return
    check_injection(task, lm[2], encoder[1])
    widths = (encoder[0], lm[0], lm[1])
    if None not in made_for and made_for != widths:
        raise AdapterError(
            f"{source} does not fit the task '{task.id}': its tensors are for a {made_for[0]}-wide encoder and a "
            f"{made_for[1]}-wide language model, but {task.encoder.display_name} is {widths[0]} wide and "
            f"{task.lm.display_name} {widths[1]}. Convert it with the task it was trained for "
            "(`python -m epalm tasks` lists them)."
        )
    load_adapter(task, state, *widths)  # every key and shape, and finite numbers


def _own_widths(state: dict[str, torch.Tensor]) -> tuple[int | None, int | None, int | None]:
    """(encoder width, LM hidden size, LM embedding size) as the checkpoint's first connector and its
    prompt have them (None where such a tensor is missing or not a matrix)."""
    connector = state.get("connector.0.weight")
    prompt = state.get("prompt_module.prefix_embedding.0.weight")
    hidden, encoder = connector.shape if connector is not None and connector.ndim == 2 else (None, None)
    return encoder, hidden, prompt.shape[1] if prompt is not None and prompt.ndim == 2 else None


def convert(src: str | Path, task: Task, out_dir: str | Path) -> Path:
    """Write `adapter.safetensors`, `adapter_config.json` and a model card for an original checkpoint,
    once its tensors are known to fit `task` (`check_fits`)."""
    state = read_adapter(src)
    check_fits(task, state, Path(src).name)
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

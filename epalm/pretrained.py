"""The real pretrained models (`HubModels`, a `store.ModelSource`): OPT, ViT, TimeSformer and AST read
from the Hub cache, the authors' adapters through `adapter_format`.

Weights are read straight from the cached files' pages and cast tensor by tensor (`read_weights`), so
that loading a 5 GB checkpoint needs the model in its dtype plus one tensor, not plus the checkpoint.
The LM's cast weights are kept for the next start, which maps them instead (`weight_files`).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Collection
from pathlib import Path

import timm
import torch
import transformers
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM, PreTrainedTokenizerBase

from . import weight_files
from .adapter_format import read_adapter
from .encoders import Encoder, attention_kernel, wrap_encoder
from .errors import Progress, WeightsUnavailable
from .hub import check, encoder_files, fetch, fetch_and_read, lm_files, locate, task_files
from .media import describe_bytes
from .tasks import EncoderRef, ModelRef, Task
from .weight_files import open_checkpoint

log = logging.getLogger(__name__)


class HubModels:
    """The real pretrained models (a `store.ModelSource`), each from the Hub cache (downloading once)."""

    random_weights = False
    stand_in = ""

    def tasks(self, registry: dict[str, Task]) -> dict[str, Task]:
        return dict(registry)

    def lm(
        self, ref: ModelRef, dtype: torch.dtype, progress: Progress | None = None
    ) -> tuple[OPTForCausalLM, PreTrainedTokenizerBase]:
        found = locate(lm_files(ref), progress)
        weights = [path for name, path in found.items() if name.endswith((".bin", ".safetensors"))]
        folder = found["config.json"].parent  # the snapshot folder holds all
        return load_lm(ref.id, folder, weights, dtype, progress, keep=True)

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
            raise WeightsUnavailable(
                f"Cannot load the {modality} encoder {ref.id}: its files cannot be read.", detail=str(exc)
            ) from exc
        return wrap_encoder(model.to(dtype))

    def adapter_state(self, task: Task, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        return fetch_and_read(task.adapter, read_adapter, progress, task.id)

    def resolve(self, task: Task, parts: Collection[str]) -> int:
        """Every file of these parts in the cache, or on the Hub (HEAD requests), or a local adapter's
        file present; the bytes still to download."""
        size = 0
        for part, files in task_files(task).items():
            if part not in parts:
                continue
            if files is None:
                fetch(task.adapter, task_id=task.id)  # a local file: checks it is there
            else:
                size += check(files)
        return size


def load_lm(
    name: str,
    folder: Path,
    weights: list[Path],
    dtype: torch.dtype,
    progress: Progress | None = None,
    keep: bool = False,
) -> tuple[OPTForCausalLM, PreTrainedTokenizerBase]:
    """An OPT LM in `dtype` and its tokenizer, from a folder holding its config and tokenizer files
    and the given weight files. Nothing is downloaded, so transformers never starts its background
    safetensors conversion (which would fetch a second copy of the weights from the Hub).
    `keep`: map the weights kept from an earlier start if there are some (`weight_files`: the same
    files, dtype and torch), else read them and keep them, in the background, for the next start."""
    kept = weight_files.load(name, weights, dtype) if keep else None
    if kept is None:
        _say(
            progress, f"Reading the weights of {name} ({describe_bytes(sum(path.stat().st_size for path in weights))})"
        )
    else:
        size = describe_bytes(sum(tensor.numel() for tensor in kept.values()) * dtype.itemsize)
        kind = weight_files.dtype_name(dtype)
        _say(progress, f"Mapping the {kind} weights of {name} kept from an earlier start ({size})")
    try:
        config = OPTConfig.from_pretrained(folder)
        state = kept if kept is not None else read_weights(weights, dtype)
        size = sum(tensor.numel() for tensor in state.values()) * dtype.itemsize
        lm = OPTForCausalLM.from_pretrained(
            None, config=config, state_dict=state, dtype=dtype, attn_implementation="eager"
        )  # the state's tensors become the parameters: no second copy
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise WeightsUnavailable(
            f"Cannot load the language model {name}: its files cannot be read.", detail=f"{folder}: {exc}"
        ) from exc
    if keep and kept is None:
        weight_files.keep(name, weights, dtype, size)
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
    as soon as its copy exists (`weight_files.page_release`), so the peak stays the model in `dtype` plus
    one tensor, not plus the whole checkpoint. Where that cannot be done (no madvise: Windows), the file
    is read into memory instead, with the same peak. Every tensor is copied out: none stays backed by
    the file."""
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        part, release = open_checkpoint(path)
        for key in list(part):
            original = part.pop(key)
            state[key] = original.to(dtype, copy=True)
            if release is not None:
                release(original)
    return state


def _say(progress: Progress | None, message: str) -> None:
    """A load stage: to `progress` (the store, which logs it), or to the log when nobody listens."""
    if progress is None:
        log.info(message)
    else:
        progress(message)

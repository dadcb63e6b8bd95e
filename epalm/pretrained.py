"""The real pretrained models (`HubModels`, a `store.ModelSource`): OPT, ViT, TimeSformer and AST read
from the Hub cache, the authors' adapters through `adapter_format`.

Weights are read straight from the cached files' pages and cast tensor by tensor (`read_weights`), so
that loading a 5 GB checkpoint needs the model in its dtype plus one tensor, not plus the checkpoint.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import pickle
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM, PreTrainedTokenizerBase

from .adapter_format import read_adapter
from .encoders import Encoder, attention_kernel, wrap_encoder
from .errors import Progress, WeightsUnavailable
from .hub import encoder_files, fetch, is_cached, lm_files, locate
from .media import describe_bytes
from .tasks import EncoderRef, ModelRef, Task

log = logging.getLogger(__name__)


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

"""Where weights come from (a `ModelSource`) and the `ModelStore` that holds one loaded copy of each.

A source turns registry references into modules: `hub.HubModels` loads the real pretrained models,
`tiny.TinyModels` builds tiny random ones. The store picks the device and dtype once, loads each LM,
encoder and adapter the first time a task needs it, and shares it between every task that names it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import Any, Protocol

import torch
from transformers import OPTForCausalLM, PreTrainedTokenizerBase

from .adapter_format import check_injection, load_adapter
from .encoders import Encoder
from .errors import InputError, Progress, WeightsUnavailable
from .model import EPALM, Adapter, pack_linear_weights, packs
from .tasks import EncoderRef, ModelRef, Task

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSource(Protocol):
    """What a `ModelStore` loads from. `random_weights`: the answers are meaningless (a smoke test)."""

    random_weights: bool

    def tasks(self, registry: dict[str, Task]) -> dict[str, Task]:
        """The registry's tasks as this source serves them (the real source: unchanged)."""

    def lm(
        self, ref: ModelRef, dtype: torch.dtype, progress: Progress | None = None
    ) -> tuple[OPTForCausalLM, PreTrainedTokenizerBase]:
        """The OPT language model (in `dtype`, on CPU) and its tokenizer; `progress` hears downloads
        and load stages."""

    def encoder(self, ref: EncoderRef, modality: str, dtype: torch.dtype, progress: Progress | None = None) -> Encoder:
        """The frozen encoder of `modality`, wrapped to return [CLS] per block."""

    def adapter_state(self, task: Task, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        """The task's connector and prompt tensors."""

    def cached(self, task: Task) -> dict[str, bool]:
        """Whether the adapter, LM and encoder of `task` are available without a download."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no GPU is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from exc


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype by name (None or "auto": float16 on GPU, float32 on CPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if DTYPES[dtype] is torch.float16 and device.type == "cpu":
        raise InputError("float16 is for GPUs; on CPU use float32 or bfloat16")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16', ... (the names `resolve_dtype` accepts)."""
    return str(dtype).removeprefix("torch.")


class ModelStore:
    """One loaded copy of each LM, encoder and adapter on one device and dtype. Concurrent first
    requests for the same model wait for a single load instead of loading a second copy.

    `pack_weights`: on CPU, store the LM's linear weights in oneDNN's blocked layout (a decode step
    is bound by reading the weights, which packed layers read faster: bench/RESULTS.md measures it;
    layers whose packed form disagrees with the dense one stay dense).
    `special_tokens`: the tokens a loaded LM's tokenizer must know (the pipeline: its tasks' answer tokens)."""

    def __init__(
        self,
        source: ModelSource,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        pack_weights: bool = True,
        progress: Progress | None = None,
        special_tokens: Callable[[ModelRef], list[str]] | None = None,
    ) -> None:
        self.source = source
        self.special_tokens = special_tokens
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pack_weights = pack_weights and packs(self.device, self.dtype)  # else no "Packing…" stage either
        self.progress = progress
        self._loaded: dict[tuple, Any] = {}
        self._names: dict[tuple, str] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def _report(self, message: str, progress: Progress | None) -> None:
        log.info(message)
        for callback in {progress, self.progress} - {None}:
            callback(message)

    def _get(
        self, key: tuple, what: str, loader: Callable[[Progress], Any], task: Task, progress: Progress | None
    ) -> Any:
        """The loaded object for `key`; `what` names it for people ("OPT-2.7B language model").
        `loader(report)` loads once; `report` tells both listeners (this call's and the store's)."""
        with self._guard:
            if key in self._loaded:
                return self._loaded[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one thread loads, the others wait for it instead of loading a second copy
            if key not in self._loaded:
                self._report(f"Loading {what}…", progress)
                started = time.perf_counter()
                try:
                    self._loaded[key] = loader(lambda message: self._report(message, progress))
                except WeightsUnavailable as exc:
                    if not exc.not_cached:
                        raise
                    raise WeightsUnavailable(
                        f"{exc} With network access, `python -m epalm download {task.id}` fetches the files "
                        f"'{task.id}' needs (and only those) into the cache; HF_HOME chooses where.",
                        not_cached=True,
                    ) from exc
                self._names[key] = what
                self._report(f"Loaded {what} in {time.perf_counter() - started:.1f} s", progress)
        return self._loaded[key]

    def lm(self, task: Task, progress: Progress | None = None) -> tuple[EPALM, PreTrainedTokenizerBase]:
        def load(report: Progress) -> tuple[EPALM, PreTrainedTokenizerBase]:
            lm, tokenizer = self.source.lm(task.lm, self.dtype, report)
            if self.special_tokens:  # e.g. the registry's answer tokens, added as the training scripts did
                tokenizer.add_special_tokens({"additional_special_tokens": self.special_tokens(task.lm)})
            model = EPALM(lm.to(self.device, self.dtype))
            if self.pack_weights:
                report(f"Packing the weights of {task.lm.display_name} for this CPU's matrix kernels…")
                log.info("packed %d linear layers of %s", pack_linear_weights(model), task.lm.id)
            return model, tokenizer

        return self._get(("lm", task.lm), f"{task.lm.display_name} language model", load, task, progress)

    def encoder(self, task: Task, progress: Progress | None = None) -> Encoder:
        def load(report: Progress) -> Encoder:
            return self.source.encoder(task.encoder, task.modality, self.dtype, report).to(self.device)

        key = ("encoder", task.encoder, task.modality)
        return self._get(key, f"{task.encoder.display_name} {task.modality} encoder", load, task, progress)

    def adapter(self, task: Task, progress: Progress | None = None) -> Adapter:
        """The task's adapter (loading its LM and encoder first: the adapter's shapes follow them)."""
        lm, _ = self.lm(task, progress)
        encoder = self.encoder(task, progress)

        def load(report: Progress) -> Adapter:
            check_injection(task, lm.config.num_hidden_layers, encoder.depth)  # before its weights are fetched
            state = self.source.adapter_state(task, report)
            adapter = load_adapter(task, state, encoder.dim, lm.config.hidden_size, lm.config.word_embed_proj_dim)
            return adapter.to(self.device)  # stays float32: a few MB, and the precision matters

        return self._get(("adapter", task.id), f"{task.label} adapter ({task.id})", load, task, progress)

    def drop_adapter(self, task_id: str) -> None:
        """Unload a task's adapter (the requests using it keep their reference until they end)."""
        with self._guard:
            self._loaded.pop(("adapter", task_id), None)
            self._names.pop(("adapter", task_id), None)

    def has(self, task: Task) -> bool:
        """Whether the task's LM, encoder and adapter are all in memory (nothing to wait for)."""
        keys = (("lm", task.lm), ("encoder", task.encoder, task.modality), ("adapter", task.id))
        return all(key in self._loaded for key in keys)

    def loaded(self, hidden: Collection[str] = ()) -> list[str]:
        """What is in memory now, in load order, named for people ("OPT-2.7B language model"); the
        adapters of the `hidden` task ids left out."""
        return [name for key, name in list(self._names.items()) if not (key[0] == "adapter" and key[1] in hidden)]

"""Where weights come from (a `ModelSource`) and the `ModelStore` that holds one loaded copy of each.

A source turns registry references into modules: `hub.HubModels` loads the real pretrained models,
`tiny.TinyModels` builds tiny random ones. The store picks the device and dtype once, loads each LM,
encoder and adapter the first time a task needs it, and shares it between every task that names it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, Protocol

import torch
from transformers import OPTForCausalLM, PreTrainedTokenizerBase

from .adapter_format import check_injection, load_adapter
from .encoders import Encoder
from .errors import InputError, Progress, Transfer, WeightsUnavailable
from .media import describe_bytes
from .model import EPALM, Adapter, pack_linear_weights, packs
from .refs import ADAPTER_PREFIX
from .tasks import EncoderRef, ModelRef, Task
from .weight_files import dtype_name, mapped_release

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSource(Protocol):
    """What a `ModelStore` loads from. `random_weights`: the answers are meaningless (a smoke test);
    `stand_in`: what its models are instead of the named ones ("tiny random stand-in"; "" for the real ones)."""

    random_weights: bool
    stand_in: str

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

    def resolve(self, task: Task, parts: Collection[str]) -> int:
        """Make sure the files of these `parts` of `task` ("lm", "encoder", "adapter") can be had, without
        downloading them (a WeightsUnavailable if one cannot); the bytes still to download."""


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


class _Load:
    """One load in flight: who hears it, and what it has said so far, replayed to whoever starts
    listening late (a request that arrives while the preload downloads). Its stages are kept in order,
    each followed by the latest download report at most. Listeners are called from the loading
    thread, under a lock that keeps each one's reports in order: they must return at once."""

    LOG_EVERY_S = 10.0  # the log takes a download's progress this often (listeners: twice a second)

    def __init__(self) -> None:
        self.listeners: list[Progress] = []
        self.said: list[str] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._logged = 0.0

    def report(self, message: str) -> None:
        with self.lock:
            transfer = isinstance(message, Transfer)
            if transfer and self.said and isinstance(self.said[-1], Transfer):
                self.said[-1] = message
            else:
                self.said.append(message)
            if not transfer:
                log.info(message)
            elif time.monotonic() - self._logged >= self.LOG_EVERY_S or message.done >= message.total:
                self._logged = time.monotonic()
                log.info(message)
            for listener in self.listeners:
                _tell(listener, message)

    @contextlib.contextmanager
    def listening(self, listener: Progress | None) -> Iterator[None]:
        """`listener` hears what was said so far, then every report until the block ends."""
        if listener is None:
            yield
            return
        with self.lock:
            for message in self.said:
                _tell(listener, message)
            self.listeners.append(listener)
        try:
            yield
        finally:
            with self.lock:
                self.listeners.remove(listener)


def _tell(listener: Progress, message: str) -> None:
    try:
        listener(message)
    except Exception:  # one listener's failure must not fail a load that others wait for
        log.exception("a progress listener failed on %r", message)


class ModelStore:
    """One loaded copy of each LM, encoder and adapter on one device and dtype. Concurrent first
    requests for the same model wait for a single load instead of loading a second copy, and each
    hears that load's stages and download progress, whoever started it.

    `pack_weights`: on CPU, store the LM's linear weights in oneDNN's blocked layout (a decode step
    is bound by reading the weights, which packed layers read faster: bench/RESULTS.md measures it;
    layers whose packed form disagrees with the dense one stay dense).
    `progress`: hears every load (each report once), besides the callers' own listeners.
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
        self._loading: dict[tuple, _Load] = {}
        self._resolved: set[tuple] = set()
        self._guard = threading.Lock()

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @staticmethod
    def _keys(task: Task) -> dict[str, tuple]:
        """What identifies each part of `task` in the store: one LM and one encoder serve many tasks."""
        return {
            "lm": ("lm", task.lm),
            "encoder": ("encoder", task.encoder, task.modality),
            "adapter": ("adapter", task.id),
        }

    def resolve(self, task: Task, progress: Progress | None = None) -> int:
        """Make sure every file `task` needs, of the parts not loaded yet, can be had: in the cache, or
        on the Hub (a HEAD request each, nothing downloaded). A request for a task whose adapter is
        missing then fails before any LM weight is read or downloaded. Returns the bytes still to
        download, which `progress` hears too. Each part is checked once per store (a load that follows
        fails on its own if a file went away since)."""
        parts = {part: key for part, key in self._keys(task).items() if key not in self._loaded}
        parts = {part: key for part, key in parts.items() if key not in self._resolved}
        if not parts:
            return 0
        try:
            size = self.source.resolve(task, list(parts))
        except WeightsUnavailable as exc:
            self._hint_download(exc, task)
            raise
        self._resolved.update(parts.values())
        if size:
            message = f"{describe_bytes(size)} to download for {task.label} before it can run"
            log.info(message)
            for callback in {progress, self.progress} - {None}:
                _tell(callback, message)
        return size

    @staticmethod
    def _hint_download(exc: WeightsUnavailable, task: Task) -> None:
        """Tell the machine's owner (the error's detail) how to get the files of a task that needs a download."""
        if not exc.not_cached:
            return
        if task.id.startswith(ADAPTER_PREFIX):  # a user's adapter: the registry names no such task to download
            hint = "With network access, the files download when first needed; HF_HOME chooses where."
        else:
            hint = (
                f"With network access, `python -m epalm download {task.id}` fetches the files '{task.id}' needs "
                "(and only those) into the cache; HF_HOME chooses where. Without any, --tiny runs the demo on "
                "tiny random models."
            )
        exc.detail = f"{exc.detail} {hint}".strip()

    def _get(
        self, key: tuple, what: str, loader: Callable[[Progress], Any], task: Task, progress: Progress | None
    ) -> Any:
        """The loaded object for `key`; `what` names it for people ("OPT-2.7B language model").
        `loader(report)` runs once; every caller meanwhile, first or not, hears `report` through its own
        `progress` (what was said before it came, then the rest), the store's `progress` once."""
        with self._guard:
            if key in self._loaded:
                return self._loaded[key]
            load = self._loading.get(key)
            first = load is None
            if first:
                load = self._loading[key] = _Load()
                if self.progress is not None:
                    load.listeners.append(self.progress)
        with load.listening(progress):
            if first:
                self._run(load, key, what, loader, task)
            else:  # another thread loads it: wait for that load instead of loading a second copy
                load.done.wait()
        if load.error is not None:
            raise load.error
        return self._loaded[key]

    def _run(self, load: _Load, key: tuple, what: str, loader: Callable[[Progress], Any], task: Task) -> None:
        stand_in = self.source.stand_in
        shown = f"{what} ({stand_in})" if stand_in else what
        started = time.perf_counter()
        try:
            load.report(f"Loading {shown}…")
            loaded = loader(load.report)
            load.report(f"Loaded {shown} in {time.perf_counter() - started:.1f} s")
        except BaseException as exc:
            if isinstance(exc, WeightsUnavailable):
                self._hint_download(exc, task)
            load.error = exc
        with self._guard:
            if load.error is None:
                self._loaded[key], self._names[key] = loaded, what
            del self._loading[key]  # the next request after a failure tries again
        load.done.set()

    def lm(self, task: Task, progress: Progress | None = None) -> tuple[EPALM, PreTrainedTokenizerBase]:
        def load(report: Progress) -> tuple[EPALM, PreTrainedTokenizerBase]:
            lm, tokenizer = self.source.lm(task.lm, self.dtype, report)
            if self.special_tokens:  # e.g. the registry's answer tokens, added as the training scripts did
                tokenizer.add_special_tokens({"additional_special_tokens": self.special_tokens(task.lm)})
            model = EPALM(lm.to(self.device, self.dtype))
            if self.pack_weights:
                report(f"Packing the weights of {task.lm.display_name} for this CPU's matrix kernels…")
                count = pack_linear_weights(model, release=mapped_release())  # weights mapped from a file: let go
                log.info("packed %d linear layers of %s", count, task.lm.id)
            return model, tokenizer

        return self._get(self._keys(task)["lm"], f"{task.lm.display_name} language model", load, task, progress)

    def encoder(self, task: Task, progress: Progress | None = None) -> Encoder:
        def load(report: Progress) -> Encoder:
            return self.source.encoder(task.encoder, task.modality, self.dtype, report).to(self.device)

        what = f"{task.encoder.display_name} {task.modality} encoder"
        return self._get(self._keys(task)["encoder"], what, load, task, progress)

    def adapter(self, task: Task, progress: Progress | None = None) -> Adapter:
        """The task's adapter (loading its LM and encoder first: the adapter's shapes follow them);
        every file the task needs is checked first (`resolve`)."""
        self.resolve(task, progress)
        lm, _ = self.lm(task, progress)
        encoder = self.encoder(task, progress)

        def load(report: Progress) -> Adapter:
            check_injection(task, lm.config.num_hidden_layers, encoder.depth)  # before its weights are fetched
            state = self.source.adapter_state(task, report)
            adapter = load_adapter(task, state, encoder.dim, lm.config.hidden_size, lm.config.word_embed_proj_dim)
            return adapter.to(self.device)  # stays float32: a few MB, and the precision matters

        return self._get(self._keys(task)["adapter"], f"{task.label} adapter ({task.id})", load, task, progress)

    def drop_adapter(self, task_id: str) -> None:
        """Unload a task's adapter (the requests using it keep their reference until they end)."""
        with self._guard:
            self._loaded.pop(("adapter", task_id), None)
            self._names.pop(("adapter", task_id), None)
            self._resolved.discard(("adapter", task_id))  # its files may be other ones next time

    def has(self, task: Task) -> bool:
        """Whether the task's LM, encoder and adapter are all in memory (nothing to wait for)."""
        return all(key in self._loaded for key in self._keys(task).values())

    def loaded(self, hidden: Collection[str] = ()) -> list[str]:
        """What is in memory now, in load order, named for people ("OPT-2.7B language model"); the
        adapters of the `hidden` task ids left out."""
        return [name for key, name in list(self._names.items()) if not (key[0] == "adapter" and key[1] in hidden)]

"""One object that serves every task: media in; what the request is doing, then text (streamed or
whole), out; with timings.

It loads lazily and keeps exactly one instance of each LM and each encoder however many tasks use
it; per-task adapters (a few MB each) are passed to the shared LM per call, never swapped into it,
so concurrent calls for different tasks cannot mix them. Every request takes the same path: its
checks, its media, its models (loading them if need be, reporting as they load), its encoder (on
the caller's thread), then the decode engine, as a batch of its own or in the shared batch
(`epalm.serving`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from .adapters import UsersAdapters, check_fits, check_mode, check_served_models, shown
from .answers import Answer, Clock, Event, Observer, Status, Timings, last
from .checks import (
    check_length,
    check_question,
    check_texts,
    decoding_options,
    prompt_ids,
    transform,
)
from .config import ServingConfig
from .decoding import DecodingOptions, stream_text
from .encoders import Encoder, FeatureCache
from .engine import Request, decode_alone
from .errors import AdapterError, InputError, Progress, UserError
from .inspection import Inspector
from .media import MediaLimits
from .model import EPALM, Adapter
from .pretrained import HubModels
from .serving import Scheduler
from .store import ModelSource, ModelStore
from .tasks import MEDIA_NAMES, AdapterConfig, Task, answer_tokens, get_task, load_registry, tasks_by_modality

log = logging.getLogger(__name__)


class OutOfMemory(UserError, RuntimeError):
    """The device ran out of memory; the message says what to try."""


@dataclass(frozen=True)
class _Plan:
    """A request, checked: what runs, on what settings."""

    task: Task
    question: str | None
    options: DecodingOptions
    transform: Any


class Pipeline:
    """Serve every registry task from shared models.

    >>> pipe = Pipeline(tiny=True)
    >>> pipe.caption("examples/image/cat.jpg", task="image-caption").text  # doctest: +SKIP
    """

    def __init__(
        self,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        tiny: bool = False,
        registry: dict[str, Task] | None = None,
        limits: MediaLimits | None = None,
        progress: Progress | None = None,
        source: ModelSource | None = None,
        pack_weights: bool = True,
        allow_local_adapters: bool = True,
        any_adapter_models: bool = True,
        batching: bool | None = None,
        max_batch_rows: int | None = None,
        feature_cache: int | None = None,
    ) -> None:
        """`source`: where the weights come from (default: the Hub; `tiny=True`: tiny random models).
        `pack_weights`: see `store.ModelStore`. `progress` hears every load stage and download.
        `allow_local_adapters`: whether `adapter=` may name a folder on this machine (not only a Hub repo).
        `any_adapter_models`: whether an adapter may name models no registry task uses (they are then
        downloaded and loaded); an app for the public serves adapters on its own models only.
        `batching`: concurrent calls (from several threads) share the LM's decode steps through an
        `epalm.serving.Scheduler`, at most `max_batch_rows` rows a step (a beam-search call takes
        `num_beams` rows). Each call's answer is the one it gets alone. `feature_cache`: how many inputs'
        encoder features are kept for media seen again (see `encoders.FeatureCache`; 0: none). The three
        default to EPALM_BATCHING, EPALM_MAX_BATCH_ROWS and EPALM_FEATURE_CACHE, else `epalm.config`'s."""
        self.allow_local_adapters = allow_local_adapters
        self.any_adapter_models = any_adapter_models
        if source is None:
            if tiny:
                from .tiny import TinyModels

                source = TinyModels()
            else:
                source = HubModels()
        self.tasks: dict[str, Task] = source.tasks(registry if registry is not None else load_registry())
        special_tokens = lambda ref: answer_tokens(self.tasks.values(), ref)  # noqa: E731
        self.store = ModelStore(source, device, dtype, pack_weights, progress, special_tokens)
        self.users = UsersAdapters(self.store.drop_adapter)  # users' adapters, apart: the registry never changes
        self.limits = limits or MediaLimits()
        serving = ServingConfig.from_env() if None in (batching, max_batch_rows, feature_cache) else None
        self.batching = serving.batching if batching is None else batching
        self.max_batch_rows = serving.max_batch_rows if max_batch_rows is None else max_batch_rows
        if self.max_batch_rows < 1:
            raise InputError("the rows limit of a batch must be at least 1")
        size = serving.feature_cache if feature_cache is None else feature_cache
        if size < 0:
            raise InputError("the feature cache size must be 0 (off) or more")
        self.features = FeatureCache(size)
        self.preloading: dict[str, str] = {}  # task id -> "waiting", "loading…", "ready" or the failure
        self._schedulers: dict[int, Scheduler] = {}
        self._schedulers_lock = threading.Lock()
        self._encode_seconds: dict[tuple, float] = {}  # (encoder, input shape) -> its last time: an estimate

    @classmethod
    def from_config(cls, config: ServingConfig, **kwargs: Any) -> Pipeline:
        """The pipeline an app serves with (`kwargs`: more `Pipeline` arguments). A ZeroGPU Space runs
        each call in a GPU process of its own, where nothing could share a decode step: no batching."""
        return cls(
            device=config.device,
            dtype=config.dtype,
            tiny=config.tiny,
            limits=config.limits,
            allow_local_adapters=config.allow_local_adapters,
            batching=config.batching and not config.zero_gpu,
            max_batch_rows=config.max_batch_rows,
            feature_cache=config.feature_cache,
            **kwargs,
        )

    @property
    def device(self) -> torch.device:
        return self.store.device

    @property
    def dtype(self) -> torch.dtype:
        return self.store.dtype

    @property
    def dtype_name(self) -> str:
        return self.store.dtype_name

    @property
    def random_weights(self) -> bool:
        """True when the models are random (`tiny`): the answers are meaningless."""
        return self.store.source.random_weights

    @property
    def default_concurrency(self) -> int:
        """Requests to serve at once: with batching, as many as one step may hold (they share each decode
        step); without, 1 on CPU and 2 on GPU (one call at a time each)."""
        if self.batching:
            return self.max_batch_rows
        return 2 if self.device.type == "cuda" else 1

    # -- models ----------------------------------------------------------------------------

    def task(self, task_id: str) -> Task:
        """A registry task, or a user's adapter served now (`use_adapter`)."""
        served = self.users.get(task_id)
        if served is not None:
            return served
        try:
            return get_task(task_id, self.tasks)
        except KeyError as exc:
            raise InputError(str(exc.args[0])) from exc

    def lm(self, task: Task, progress: Progress | None = None) -> tuple[EPALM, Any]:
        """The task's language model (with injection) and tokenizer, loaded on first use."""
        return self.store.lm(task, progress)

    def encoder(self, task: Task, progress: Progress | None = None) -> Encoder:
        return self.store.encoder(task, progress)

    def adapter(self, task: Task, progress: Progress | None = None) -> Adapter:
        return self.store.adapter(task, progress)

    def use_adapter(self, source: str, modality: str | None = None, kind: str | None = None) -> str:
        """Serve a trained adapter now (see `_serve_adapter`) and return its task id."""
        task = self._serve_adapter(source, modality, kind)
        self.users.release(task.id)
        return task.id

    def _serve_adapter(self, source: str, modality: str | None, kind: str | None) -> Task:
        """Serve a trained adapter (a folder, or a Hub repo id) with the models its config names, shared
        with every other task; returns its task. Its config is read alone (a Hub adapter's weights come
        when it loads) and refused, before anything loads, when it does not fit its models, when it is not
        for `modality`/`kind` (if given), or, unless `any_adapter_models`, when its models are not the
        registry's. A refused adapter is not served; the checks that depend on the caller run on every
        call. A few are kept ready, as their files are now (`adapters.UsersAdapters`). The adapter comes
        held: the caller releases it (`self.users.release`)."""

        def accept(config: AdapterConfig) -> None:
            if config.tiny != self.random_weights:
                models = ("tiny test", "real") if config.tiny else ("real", "tiny test")
                raise InputError(
                    f"The adapter {shown(source)} was trained on the {models[0]} models, not the {models[1]} ones."
                )
            check_fits(config.task, self.tasks.values())
            self._check_use(config.task, source, modality, kind)

        task = self.users.serve(source, self.allow_local_adapters, accept)
        try:
            self._check_use(task, source, modality, kind)  # this caller's rules, served before or not
        except BaseException:
            self.users.release(task.id)
            raise
        return task

    def _check_use(self, task: Task, source: str, modality: str | None, kind: str | None) -> None:
        if kind is not None:
            check_mode(task, modality, kind, source)
        if not self.any_adapter_models:
            check_served_models(task, self.tasks.values())

    def is_adapter_served(self, source: str) -> bool:
        """Whether `use_adapter(source)` has already read this adapter (no download to wait for)."""
        try:
            return self.users.task_id(source, self.allow_local_adapters) in self.users
        except UserError:
            return False

    def preload(self, task_ids: list[str], progress: Progress | None = None) -> None:
        for task_id in task_ids:
            self._models(self.task(task_id), progress)

    def start_preload(self, task_ids: list[str] | None = None) -> threading.Thread:
        """Load these tasks in the background, one after the other (default: the first task of the
        first modality and kind, where an app opens); `preloading` says how each one went. A request
        for one of them meanwhile waits for it, hearing its progress."""
        if task_ids is None:
            first = next(iter(tasks_by_modality(self.tasks.values()).values()), {})
            task_ids = [next(iter(first.values()))[0].id] if first else []
        unknown = [task_id for task_id in task_ids if task_id not in self.tasks]
        if unknown:
            raise InputError(f"unknown task(s) to preload: {', '.join(unknown)}; known tasks: {', '.join(self.tasks)}")
        self.preloading.update({task_id: "waiting" for task_id in task_ids})
        thread = threading.Thread(target=self._preload, args=(task_ids,), name="epalm-preload", daemon=True)
        thread.start()
        return thread

    @property
    def preloading_now(self) -> bool:
        """Whether a preload is waiting or loading."""
        return any(state in ("waiting", "loading…") for state in self.preloading.values())

    def _preload(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            self.preloading[task_id] = "loading…"
            try:
                self.preload([task_id])
                self.preloading[task_id] = "ready"
            except UserError as exc:
                log.warning("preload of %s failed: %s%s", task_id, exc, f" ({exc.detail})" if exc.detail else "")
                self.preloading[task_id] = f"failed: {exc}"
            except Exception as exc:
                log.exception("preload of %s failed", task_id)
                self.preloading[task_id] = f"failed: {type(exc).__name__}: {exc}"

    def loaded(self, users_adapters: bool = True) -> list[str]:
        """Human-readable names of what is in memory now (`users_adapters=False`: not the adapters
        `use_adapter` served, which a public app does not show one user of another)."""
        return self.store.loaded(() if users_adapters else self.users)

    def scheduler(self, lm: EPALM) -> Scheduler:
        """The one scheduler that batches the decode steps of `lm`."""
        with self._schedulers_lock:
            if id(lm) not in self._schedulers:
                self._schedulers[id(lm)] = Scheduler(lm, self.max_batch_rows)
            return self._schedulers[id(lm)]

    def _models(self, task: Task, progress: Progress | None) -> tuple[EPALM, Any, Encoder, Adapter]:
        self.store.resolve(task, progress)  # every file the task needs, known before anything loads
        lm, tokenizer = self.lm(task, progress)
        encoder = self.encoder(task, progress)
        try:
            return lm, tokenizer, encoder, self.adapter(task, progress)
        except AdapterError:
            self.users.forget(task.id)  # a user's adapter that does not fit its models is not served
            raise

    def _loading(self, task: Task, progress: Progress | None) -> Generator[Status, None, tuple]:
        """The task's models; while they load (here or for another request), a `Status` per report."""
        if self.store.has(task):
            return self._models(task, progress)
        reports: queue.SimpleQueue = queue.SimpleQueue()
        outcome: dict[str, Any] = {}

        def load() -> None:
            try:
                outcome["models"] = self._models(
                    task, lambda message: (reports.put(message), progress and progress(message))
                )
            except BaseException as exc:  # raised on the request's own thread
                outcome["error"] = exc
            finally:
                reports.put(None)

        threading.Thread(target=load, name="epalm-load", daemon=True).start()
        while (message := reports.get()) is not None:
            yield Status("loading", message)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["models"]

    # -- answering -------------------------------------------------------------------------

    def decoding_options(self, task: Task, preset: str | None = None, **overrides: Any) -> DecodingOptions:
        """The task's settings, the preset's rules applied (default: paper, the task's own), then
        `overrides` (fields of `DecodingOptions`; None means "not given")."""
        return decoding_options(task, preset, overrides)

    def _plan(
        self,
        task: Any,
        question: Any,
        preset: Any,
        num_frames: Any,
        adapter: Any,
        modality: Any,
        overrides: dict[str, Any],
    ) -> _Plan:
        """Every check of a request's own values, before anything loads; each refusal names the value. A
        user's adapter comes held (see `_serve_adapter`); the caller releases it."""
        check_texts(task=task, adapter=adapter, question=question, modality=modality)
        adapter = adapter.strip() or None if adapter is not None else None  # an empty field: the task's own
        if adapter is not None:
            spec = self._serve_adapter(adapter, modality, "caption" if question is None else "qa")
        elif task:
            spec = self.task(task)
        else:
            raise InputError("Name a task or an adapter.")
        try:
            if modality is not None and spec.modality != modality:
                raise InputError(f"'{spec.title}' takes {spec.modality}, not {modality}.")
            options = decoding_options(spec, preset, overrides)
            return _Plan(spec, check_question(spec, question), options, transform(spec, num_frames))
        except BaseException:
            self.users.release(spec.id)  # (a registry task: nothing to release)
            raise

    def stream(
        self,
        media: Any,
        task: str | None,
        question: str | None = None,
        preset: str | None = None,
        num_frames: int | None = None,
        progress: Progress | None = None,
        inspect: bool = False,
        adapter: str | None = None,
        modality: str | None = None,
        observer: Observer | None = None,
        **overrides: Any,
    ) -> Iterator[Event]:
        """What the request is doing (`Status`: its models loading, whoever started the load, with their
        download bytes; its encoder; a beam search's best beam so far), partial answers as they are
        generated (greedy and sampling), then the final `Answer`. Bad input fails before any model loads.
        `inspect`: answers carry an `Inspection` (see epalm.inspection); off, nothing of it is computed.
        `adapter`: a trained adapter (folder or Hub repo id) to use instead of `task`, refused unless it is
        for `modality` (when given) and for captions (`question` None) or questions. `observer` hears
        where the time went (see `Observer`). Closing the iterator (Stop, a closed tab) ends the request
        at its next step, in the shared batch or alone."""
        clock = Clock(observer)
        if isinstance(adapter, str) and adapter.strip() and not self.is_adapter_served(adapter.strip()):
            yield Status("loading", "Reading the adapter's settings…")
        plan = self._plan(task, question, preset, num_frames, adapter, modality, overrides)
        try:  # a user's adapter, held since it was served, stays loaded until the request ends
            if media is None or (isinstance(media, str) and not media.strip()):
                raise InputError(f"Please upload {MEDIA_NAMES[plan.task.modality]} first.")
            yield from self._answer(plan, media, inspect, progress, clock)
        finally:
            self.users.release(plan.task.id)

    def _answer(
        self, plan: _Plan, media: Any, inspect: bool, progress: Progress | None, clock: Clock
    ) -> Iterator[Event]:
        """One checked request: its media, its models, its encoder, then the engine."""
        spec, options = plan.task, plan.options
        inspector = Inspector(spec, lambda function: clock.wrap("inspect_media", function)) if inspect else None
        timings = Timings(num_beams=options.num_beams)
        with clock("media") as spent:
            if inspector:
                pixels = inspector.prepare(media, plan.transform, self.limits)
            else:
                pixels = spec.prepare(media, self.limits, plan.transform)
        timings.media_s = spent()
        with clock("load"):
            lm, tokenizer, encoder, adapter_module = yield from self._loading(spec, progress)
        input_ids = torch.tensor([prompt_ids(spec, plan.question, tokenizer)], device=self.device)
        notice = check_length(options, input_ids.shape[1], lm.config.max_position_embeddings)
        options = replace(options, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if inspector:
            with clock("inspect_decode"):
                inspector.read_prompt(input_ids, tokenizer)
        estimate = (id(encoder), tuple(pixels.shape))
        yield Status("encoding", f"Encoding the {_described(spec, pixels)}…", self._encode_seconds.get(estimate))
        with self._out_of_memory(spec):
            with clock("encode") as spent:
                features, timings.features_cached = self.features.features(encoder, pixels, spec.injection.num_features)
                prefix = adapter_module.prefix(features[:, None])
            timings.encode_s = spent()
            if not timings.features_cached:
                self._encode_seconds[estimate] = timings.encode_s
            trace = clock.wrap("inspect_decode", inspector.trace) if inspector else None
            request = Request(prefix, input_ids, options, trace=trace)
            with clock("decode"):
                tokens = self.scheduler(lm).submit(request) if self.batching else decode_alone(lm, request)
                try:
                    yield from self._decoding(spec, request, tokens, tokenizer, timings, inspector, notice)
                finally:
                    tokens.close()  # a consumer that stops early (Stop, closed tab) frees the rows now
                    request.cancel()  # (and one that never read a token: a no-op once finished)
            generated = request.result()
            output = generated.sequences[0, input_ids.shape[1] :].tolist()
        if not options.streams:
            timings.new_tokens = sum(token != options.pad_token_id for token in output)
        text = tokenizer.decode(output, skip_special_tokens=True).strip()
        inspected = None
        if inspector:
            with clock("inspect_decode"):
                hypotheses = generated.hypotheses
                stopped = output[: timings.new_tokens] if options.streams else output
                inspected = inspector.result(
                    tokenizer, input_ids, options, stopped, hypotheses[0] if hypotheses else None
                )
        yield Answer(text, spec.id, True, timings, self.device.type, self.dtype_name, inspected, notice)

    def _decoding(
        self,
        task: Task,
        request: Request,
        tokens: Iterator[torch.Tensor],
        tokenizer: Any,
        timings: Timings,
        inspector: Inspector | None,
        notice: str | None,
    ) -> Iterator[Event]:
        """Partial answers (greedy, sampling) or the beam search's progress, as the tokens come."""
        started, options = time.perf_counter(), request.options
        prompt = request.input_ids.shape[1]
        limit = options.length_limit(prompt)

        def counted() -> Iterator[torch.Tensor]:
            for step in tokens:
                now = time.perf_counter()
                if timings.new_tokens == 0 and options.streams:
                    timings.first_token_s = now - started
                timings.generate_s = now - started
                timings.new_tokens += 1
                yield step

        if options.streams:
            partial = inspector.partial(options) if inspector else None
            for text in stream_text(counted(), tokenizer):
                yield Answer(text.strip(), task.id, False, replace(timings), self.device.type, self.dtype_name, partial)
            return
        for _ in counted():
            best = tokenizer.decode(request.rule.ids[0, prompt:].tolist(), skip_special_tokens=True).strip()
            steps = timings.new_tokens
            eta = (limit - prompt - steps) * timings.generate_s / steps
            message = f"{options.num_beams}-beam search: {steps} tokens so far; best beam: {best or '…'}"
            yield Status("decoding", message, eta if eta > 0 else None)
        timings.generate_s = time.perf_counter() - started

    @contextlib.contextmanager
    def _out_of_memory(self, task: Task) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, MemoryError) as exc:
            if not _is_oom(exc):
                raise
            raise OutOfMemory(
                f"Out of memory on {self.device.type} while running '{task.id}'. Try a smaller model (the OPT-2.7B "
                f"tasks instead of -L), --dtype bfloat16, fewer video frames, or a machine with more memory."
            ) from exc

    def caption(self, media: Any, task: str = "image-caption", **kwargs: Any) -> Answer:
        """The final caption (see `stream` for the keyword arguments)."""
        return last(self.stream(media, task, None, **kwargs))

    def answer(self, media: Any, question: str, task: str = "image-vqa", **kwargs: Any) -> Answer:
        """The final answer to `question` about `media`."""
        return last(self.stream(media, task, question, **kwargs))


def _described(task: Task, pixels: torch.Tensor) -> str:
    if task.modality == "video":
        return f"video ({len(pixels)} frames)"
    return {"image": "image", "audio": "audio"}[task.modality]


def _is_oom(exc: BaseException) -> bool:
    message = str(exc).lower()
    return (
        isinstance(exc, (torch.OutOfMemoryError, MemoryError))
        or "out of memory" in message
        or "can't allocate memory" in message
    )

"""One object that serves every task: media in, text (streamed or whole) out, with timings.

It loads lazily and keeps exactly one instance of each LM and each encoder however many tasks use
it; per-task adapters (a few MB each) are passed to the shared LM per call, never swapped into
it, so concurrent calls for different tasks cannot mix them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .adapters import (
    adapter_task_id,
    check_fits,
    check_mode,
    check_served_models,
    check_source,
    read_adapter_config,
    shown,
)
from .audio import prepare_audio
from .decoding import DecodingOptions, generate, stream_text, stream_tokens
from .encoders import FEATURE_CACHE, Encoder, FeatureCache
from .errors import AdapterError, InputError, Progress, UserError
from .image import prepare_image
from .inspection import Inspection, Inspector
from .media import MediaLimits
from .model import EPALM, Adapter
from .presets import DEFAULT_PRESET, PRESETS
from .pretrained import HubModels
from .serving import MAX_BATCH_ROWS, Request, Scheduler
from .store import ModelSource, ModelStore
from .tasks import Task, answer_tokens, get_task, load_registry
from .video import prepare_video

log = logging.getLogger(__name__)

# The question limits, the same in the library, the CLI and the app. The token limit bounds the prompt ids (BOS,
# question, the task's "?</a>"); the characters, checked first, are the cheap bound: 300 characters of English are
# about 75 OPT tokens, well inside it, so only densely tokenized text (symbols, non-Latin scripts) meets the token
# limit. However long the prompt within these limits, the task's `min_answer_tokens` still fit after it.
MAX_QUESTION_CHARS = 300
MAX_QUESTION_TOKENS = 128
_PREPARE: dict[str, Callable[..., torch.Tensor]] = {
    "image": prepare_image,
    "video": prepare_video,
    "audio": prepare_audio,
}


class OutOfMemory(UserError, RuntimeError):
    """The device ran out of memory; the message says what to try."""


@dataclass
class Timings:
    """Where the time of one answer went, as of the answer it belongs to."""

    encode_s: float = 0.0  # media decoding + preprocessing + encoder + adapter
    features_cached: bool = False  # the encoder did not run: its features for this media were kept from before
    first_token_s: float | None = None  # start of decoding to the first token shown; None for beam search (none early)
    generate_s: float = 0.0  # decoding so far
    new_tokens: int = 0
    num_beams: int = 1

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.generate_s if self.generate_s > 0 else 0.0

    def summary(self) -> str:
        tokens = f"{self.new_tokens} tokens in {self.generate_s:.2f} s ({self.tokens_per_s:.1f} tokens/s)"
        encode = f"encode {self.encode_s:.2f} s" + (" (features reused)" if self.features_cached else "")
        if self.first_token_s is None:  # beam search: no token is final before the search ends
            return f"{encode} · {self.num_beams}-beam search: {tokens}, shown at its end"
        return f"{encode} · first token {self.first_token_s:.2f} s · {tokens}"


@dataclass
class Answer:
    """A (partial) answer: `done` is False while streaming, True for the final text. `notice` tells
    the user about a setting changed for this request (a long question's raised length limit)."""

    text: str
    task: str
    done: bool
    timings: Timings = field(default_factory=Timings)
    device: str = "cpu"
    dtype: str = "float32"
    inspection: Inspection | None = None  # with `inspect=True`: what the model saw (and, when done, how sure it was)
    notice: str | None = None


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
        `num_beams` rows); defaults from EPALM_BATCHING (1/0, on) and EPALM_MAX_BATCH_ROWS (24).
        Each call's answer is the one it gets alone. `feature_cache`: how many inputs' encoder features
        are kept for media seen again (another question, preset or task; see `encoders.FeatureCache`;
        0: none); defaults from EPALM_FEATURE_CACHE (64)."""
        self.allow_local_adapters = allow_local_adapters
        self.any_adapter_models = any_adapter_models
        if source is None:
            if tiny:
                from .tiny import TinyModels

                source = TinyModels()
            else:
                source = HubModels()
        self.tasks: dict[str, Task] = source.tasks(registry if registry is not None else load_registry())
        self._adapters: dict[str, Task] = {}  # users' adapters (`use_adapter`), apart: the registry never changes
        special_tokens = lambda ref: answer_tokens(self.tasks.values(), ref)  # noqa: E731
        self.store = ModelStore(source, device, dtype, pack_weights, progress, special_tokens)
        self.limits = limits or MediaLimits()
        self.batching = _env_flag("EPALM_BATCHING", True) if batching is None else batching
        self.max_batch_rows = (
            _env_int("EPALM_MAX_BATCH_ROWS", MAX_BATCH_ROWS) if max_batch_rows is None else max_batch_rows
        )
        if self.max_batch_rows < 1:
            raise InputError("the rows limit of a batch must be at least 1")
        size = _env_int("EPALM_FEATURE_CACHE", FEATURE_CACHE) if feature_cache is None else feature_cache
        if size < 0:
            raise InputError("the feature cache size must be 0 (off) or more")
        self.features = FeatureCache(size)
        self._schedulers: dict[int, Scheduler] = {}
        self._schedulers_lock = threading.Lock()

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

    # -- models ----------------------------------------------------------------------------

    def task(self, task_id: str) -> Task:
        """A registry task, or a user's adapter served so far (`use_adapter`)."""
        if task_id in self._adapters:
            return self._adapters[task_id]
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
        """Serve a trained adapter (a folder, or a Hub repo id) with the models its config names,
        shared with every other task; returns its task id (`adapter_task_id(source)`). Its config is read
        alone (a Hub adapter's weights come when it loads) and refused, before anything loads, when it
        does not fit its models, when it is not for `modality`/`kind` (if given), or, unless
        `any_adapter_models`, when its models are not the registry's. A refused adapter is not served;
        the checks run on every call, served before or not."""
        check_source(source, self.allow_local_adapters)  # served before or not: the setting may have changed
        task_id = adapter_task_id(source)
        task = self._adapters.get(task_id)
        if task is None:
            config = read_adapter_config(source, self.allow_local_adapters)
            if config.tiny != self.random_weights:
                models = ("tiny test", "real") if config.tiny else ("real", "tiny test")
                raise InputError(
                    f"The adapter {shown(source)} was trained on the {models[0]} models, not the {models[1]} ones."
                )
            task = config.task  # settings as trained: on this pipeline's kind of models, as just checked
            check_fits(task, self.tasks.values())
        if kind is not None:
            check_mode(task, modality, kind, source)
        if not self.any_adapter_models:
            check_served_models(task, self.tasks.values())
        self._adapters[task_id] = task  # one dict store: atomic
        return task_id

    def is_adapter_served(self, source: str) -> bool:
        """Whether `use_adapter(source)` has already read this adapter (no download to wait for)."""
        return adapter_task_id(source) in self._adapters

    def preload(self, task_ids: list[str], progress: Progress | None = None) -> None:
        for task_id in task_ids:
            self.adapter(self.task(task_id), progress)

    def loaded(self, users_adapters: bool = True) -> list[str]:
        """Human-readable names of what is in memory now (`users_adapters=False`: not the adapters
        `use_adapter` served, which a public app does not show one user of another)."""
        return self.store.loaded(() if users_adapters else set(self._adapters))

    def scheduler(self, lm: EPALM) -> Scheduler:
        """The one scheduler that batches the decode steps of `lm`."""
        with self._schedulers_lock:
            if id(lm) not in self._schedulers:
                self._schedulers[id(lm)] = Scheduler(lm, self.max_batch_rows, features=self.features)
            return self._schedulers[id(lm)]

    # -- answering -------------------------------------------------------------------------

    def decoding_options(self, task: Task, preset: str | None = None, **overrides: Any) -> DecodingOptions:
        """The task's settings, the preset's rules applied (default: paper, the task's own), then
        `overrides` (fields of `DecodingOptions`; None means "not given")."""
        preset = preset or DEFAULT_PRESET
        if preset not in PRESETS:
            raise InputError(f"unknown decoding preset {preset!r}; choose one of {', '.join(PRESETS)}")
        try:
            options = PRESETS[preset].apply(task.generation)
            return replace(options, **{k: v for k, v in overrides.items() if v is not None})
        except (TypeError, ValueError) as exc:
            raise InputError(f"invalid decoding settings: {exc}") from exc

    def _check_question(self, task: Task, question: str | None) -> str | None:
        if not task.needs_question:
            if question and question.strip():  # never answer something else than what was asked
                raise InputError(f"'{task.title}' writes a caption and takes no question; choose a question task.")
            return None
        question = (question or "").strip()
        if not question:
            raise InputError(f"Please type a question: '{task.title}' answers questions about the {task.modality}.")
        if len(question) > MAX_QUESTION_CHARS:
            raise InputError(f"The question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}.")
        return question

    def _text_ids(self, task: Task, question: str | None, tokenizer: Any) -> torch.Tensor:
        """BOS then the task's text, as the original tokenizer call produced them."""
        ids = task.text.prompt_ids(tokenizer, question)
        if len(ids) > MAX_QUESTION_TOKENS:
            raise InputError(
                f"The question is {len(ids)} tokens long; the limit is {MAX_QUESTION_TOKENS}. Please shorten it."
            )
        return torch.tensor([ids], device=self.device)

    @staticmethod
    def _check_length(options: DecodingOptions, prompt_ids: int, positions: int) -> str | None:
        """Refuse a length the LM has no positions for; return the notice for a limit raised to
        leave a long question its task's minimum answer."""
        limit = options.length_limit(prompt_ids)
        if limit > positions:
            raise InputError(
                f"{prompt_ids} prompt tokens and {limit - prompt_ids} new tokens exceed the model's {positions} "
                "positions; lower max new tokens."
            )
        if not options.extends_limit(prompt_ids):
            return None
        return (
            f"Long question: its {prompt_ids} tokens leave {max(0, options.max_length - prompt_ids)} of the task's "
            f"{options.max_length} (max_length counts the question), so the answer was allowed up to "
            f"{options.min_answer_tokens} new tokens; raise max new tokens for a longer answer."
        )

    @torch.inference_mode()  # as a decorator: entered per step, never held across a yield
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
        **overrides: Any,
    ) -> Iterator[Answer]:
        """Partial answers as they are generated (greedy and sampling), then the final one.
        Beam search yields only the final answer. Bad input fails before any model loads.
        `inspect`: answers carry an `Inspection` (see epalm.inspection); off, nothing of it is computed.
        `adapter`: a trained adapter (folder or Hub repo id) to use instead of `task`, refused unless it is
        for `modality` (when given) and for captions (`question` None) or questions."""
        if adapter is not None:
            task = self.use_adapter(adapter, modality, "caption" if question is None else "qa")
        if task is None:
            raise InputError("Name a task or an adapter.")
        spec = self.task(task)
        if modality is not None and spec.modality != modality:
            raise InputError(f"'{spec.title}' takes {spec.modality}, not {modality}.")
        question = self._check_question(spec, question)
        options = self.decoding_options(spec, preset, **overrides)
        transform = spec.preprocess
        if num_frames is not None and spec.modality == "video":
            if not 1 <= num_frames <= 64:
                raise InputError("frames to sample must be between 1 and 64")
            transform = replace(transform, num_frames=num_frames)
        timings = Timings(num_beams=options.num_beams)
        started = time.perf_counter()
        inspector = Inspector(spec) if inspect else None
        pixels = (inspector.prepare if inspector else _PREPARE[spec.modality])(media, transform, self.limits)
        timings.encode_s = time.perf_counter() - started
        self.store.resolve(spec, progress)  # issue 24 (load helper): every file the task needs, before any loads
        lm, tokenizer = self.lm(spec, progress)
        input_ids = self._text_ids(spec, question, tokenizer)
        notice = self._check_length(options, input_ids.shape[1], lm.config.max_position_embeddings)
        options = replace(options, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        trace = inspector.trace if inspector else None
        if inspector:
            inspector.read_prompt(input_ids, tokenizer)
        try:
            adapter, encoder = self.adapter(spec, progress), self.encoder(spec, progress)
        except AdapterError:
            self._adapters.pop(spec.id, None)  # a user's adapter that does not fit its models is not served
            raise
        dtype = self.store.dtype_name
        with self._out_of_memory(spec):
            started = time.perf_counter()
            mask = torch.ones_like(input_ids)
            if self.batching and options.use_cache:
                request = self.scheduler(lm).submit(pixels, encoder, adapter, input_ids, options, trace)
                tokens, generated = request.tokens(), request.result
                decoding_started = functools.partial(self._encoded, request, timings, started)
            else:
                features, cached = self.features.encode(encoder, [pixels], spec.injection.num_features)
                timings.features_cached = cached[0]
                prefix = adapter.prefix(features)
                timings.encode_s += time.perf_counter() - started
                decoding_started = functools.partial(float, time.perf_counter())
                tokens = stream_tokens(lm, prefix, input_ids, mask, options, trace=trace) if options.streams else None
                generated = functools.partial(generate, lm, prefix, input_ids, mask, options, trace=trace)
            if options.streams:
                ids: list[int] = []
                partial = inspector.partial(options) if inspector else None
                try:
                    for text in stream_text(self._timed(tokens, timings, decoding_started, ids), tokenizer):
                        timed = replace(timings)
                        yield Answer(text.strip(), spec.id, False, timed, self.device.type, dtype, partial, notice)
                finally:
                    tokens.close()  # a consumer that stops early (Stop, closed tab) frees the rows now
                text = tokenizer.decode(ids, skip_special_tokens=True)
                inspected = inspector.result(tokenizer, input_ids, options, ids) if inspector else None
            else:
                generated = generated()
                output = generated.sequences[0, input_ids.shape[1] :]
                timings.generate_s = time.perf_counter() - decoding_started()
                timings.new_tokens = int((output != options.pad_token_id).sum())
                text = tokenizer.decode(output, skip_special_tokens=True)
                hypotheses = generated.hypotheses[0] if generated.hypotheses else None
                inspected = (
                    inspector.result(tokenizer, input_ids, options, output.tolist(), hypotheses) if inspector else None
                )
        yield Answer(text.strip(), spec.id, True, timings, self.device.type, dtype, inspection=inspected, notice=notice)

    @staticmethod
    def _encoded(request: Request, timings: Timings, submitted: float) -> float:
        """When a batched request's decoding started (its encoder done; asked once, at its first
        token): its encoding, waiting for a place in the batch included, counts to `encode_s`."""
        timings.encode_s += request.encoded - submitted
        timings.features_cached = request.features_cached
        return request.encoded

    @staticmethod
    def _timed(
        tokens: Iterator[torch.Tensor], timings: Timings, started: Callable[[], float], ids: list[int]
    ) -> Iterator[torch.Tensor]:
        start = None
        for step in tokens:
            now = time.perf_counter()
            if start is None:
                start = started()
                timings.first_token_s = now - start
            timings.generate_s = now - start
            ids.append(int(step[0]))
            timings.new_tokens = len(ids)
            yield step

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
        return _last(self.stream(media, task, None, **kwargs))

    def answer(self, media: Any, question: str, task: str = "image-vqa", **kwargs: Any) -> Answer:
        """The final answer to `question` about `media`."""
        return _last(self.stream(media, task, question, **kwargs))


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise InputError(f"{name} must be 1 or 0, not {value!r}")
    return value in ("1", "true", "yes", "on")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise InputError(f"{name} must be a whole number, not {value!r}") from None


def _is_oom(exc: BaseException) -> bool:
    message = str(exc).lower()
    return (
        isinstance(exc, (torch.OutOfMemoryError, MemoryError))
        or "out of memory" in message
        or "can't allocate memory" in message
    )


def _last(answers: Iterator[Answer]) -> Answer:
    final = None
    for final in answers:  # noqa: B007 (keeps the last one)
        pass
    return final

"""Continuous batching: many requests decoded together through one shared LM.

Decoding one row reads every weight of the LM once per token; so does decoding eight rows. A
`Scheduler` owns one LM and a thread that steps all live requests at once: a request joins the
batch at the next step after it arrives (its encoder, adapter and prefill run first, batched with
the other newcomers that wait for the same encoder) and leaves when it finishes or is cancelled.
Rows of different tasks, adapters and decoding settings share a step: the injected features and
soft prompt are per row (`Prefix`), and each request keeps its own step rule from
`epalm.decoding` (greedy, sampling or 4.24 beam search), applied to its slice of the batch's
logits, so its ids are those it would get alone. Rows whose injection layouts differ (another
start/end layer, prompt length or feature count) cannot share a forward and step as separate groups.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass, field

import torch

from .decoding import DecodingOptions, GenerationOutput, StepRule, Trace, beam_rows, step_rule
from .encoders import Encoder, FeatureCache
from .model import EPALM, Adapter, DecodeState, Prefix

log = logging.getLogger(__name__)

_DONE = object()  # end of a request's stream
MAX_BATCH_ROWS = 24  # rows per step by default: eight paper (3-beam) requests


@dataclass(eq=False)
class Request:
    """One submitted decode. The caller iterates `tokens()` (greedy, sampling) or waits on
    `result()`; `cancel()` (or closing the iterator) makes it leave the batch at the next step."""

    media: torch.Tensor  # one prepared input, without the batch dimension
    encoder: Encoder
    adapter: Adapter
    input_ids: torch.Tensor  # [1, T]
    options: DecodingOptions
    trace: Trace | None = None
    rule: StepRule | None = field(default=None, init=False)
    encoded: float = field(default=0.0, init=False)  # time.perf_counter() when its encoder and adapter were done
    features_cached: bool = field(default=False, init=False)  # its encoder features came from the FeatureCache
    pending: torch.Tensor | None = field(default=None, init=False)  # tokens to feed at the next step
    cancelled: threading.Event = field(default_factory=threading.Event, init=False)
    _events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, init=False)

    @property
    def layout(self) -> tuple:
        return self.adapter.config.layout

    @property
    def rows(self) -> int:
        return self.options.num_beams * len(self.input_ids)

    def cancel(self) -> None:
        self.cancelled.set()

    def tokens(self) -> Iterator[torch.Tensor]:
        """Each step's new tokens ([rows]) as the batch produces them."""
        try:
            while True:
                event = self._events.get()
                if event is _DONE:
                    return
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            self.cancel()  # a no-op once finished; otherwise the consumer has gone

    def result(self) -> GenerationOutput:
        """The whole output, as `decoding.generate` returns it (CancelledError: cancelled before it started)."""
        for _ in self.tokens():
            pass
        if self.rule is None:
            raise CancelledError("the request was cancelled before it started")
        return self.rule.result()

    def _put(self, event: object) -> None:
        self._events.put(event)


@dataclass
class _Group:
    """Requests of one injection layout stepping together; `state` holds their rows in order."""

    requests: list[Request]
    state: DecodeState


class Scheduler:
    """Steps every live request of one LM together (see the module docstring). `max_rows` bounds the
    rows of one step (a beam-search request takes `num_beams` rows): requests beyond it wait, first
    come first served, and one request larger than the limit runs alone. The thread runs while there
    is work and exits when there is none."""

    def __init__(
        self,
        model: EPALM,
        max_rows: int = MAX_BATCH_ROWS,
        callback: Callable[[int], None] | None = None,
        features: FeatureCache | None = None,
    ) -> None:
        """`callback`, if given, is called after each batched step with the rows it ran (before the
        step's tokens are delivered). `features`: the encoder features to reuse (None: none kept)."""
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.model, self.max_rows, self.callback = model, max_rows, callback
        self.features = features if features is not None else FeatureCache(0)
        self._waiting: list[Request] = []
        self._groups: dict[tuple, _Group] = {}
        self._current: list[Request] = []  # the requests of the iteration under way
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        _SCHEDULERS.add(self)

    def submit(
        self,
        media: torch.Tensor,
        encoder: Encoder,
        adapter: Adapter,
        input_ids: torch.Tensor,
        options: DecodingOptions,
        trace: Trace | None = None,
    ) -> Request:
        """Queue one decode; it joins the batch at the next step."""
        if not options.use_cache:
            raise ValueError("the scheduler runs the cached decoder only (use_cache=True)")
        request = Request(media, encoder, adapter, input_ids, options, trace)
        with self._lock:
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="epalm-scheduler", daemon=True)
                self._thread.start()
        return request

    def close(self, timeout: float = 30.0) -> None:
        """Cancel every request and wait for the thread to end (done at exit: a thread stopped in the
        middle of a step by the interpreter's shutdown aborts the process)."""
        with self._lock:
            requests = self._waiting + self._current  # the batch's requests are all in _current
            thread = self._thread
        for request in requests:
            request.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _running(self) -> list[Request]:
        """The requests in the batch (caller holds the lock)."""
        return [request for group in self._groups.values() for request in group.requests]

    @property
    def rows(self) -> int:
        """Rows in the running batch now."""
        with self._lock:
            return self._rows()

    def _rows(self) -> int:
        """Rows in the running batch (caller holds the lock)."""
        return sum(len(group.state.text_mask) for group in self._groups.values())

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._next():
                    pass
        except BaseException as exc:  # a bug outside a group's step: nobody may wait forever
            with self._lock:
                stranded = self._waiting + self._current
                self._waiting, self._current, self._groups, self._thread = [], [], {}, None
            log.exception("the batch scheduler failed; its %d request(s) get the error", len(stranded))
            _fail(stranded, exc)

    def _next(self) -> bool:
        """Admit what fits, then one step of every group; False when there is nothing left to do."""
        with self._lock:
            self._waiting = [r for r in self._waiting if not _left(r)]
            admitted = self._admissible(self._rows())
            if not admitted and not self._groups:
                self._thread = None
                return False
            self._current = admitted + self._running()
        units = self._start(admitted)
        for layout in {requests[0].layout for requests, _ in units} | set(self._groups):
            self._step(layout, [unit for unit in units if unit[0][0].layout == layout])
        return True

    def _admissible(self, running: int) -> list[Request]:
        """Pop the waiting requests that fit next to `running` rows (caller holds the lock)."""
        admitted = []
        while self._waiting:
            rows = self._waiting[0].rows
            if running + rows > self.max_rows and (running or admitted):
                break
            admitted.append(self._waiting.pop(0))
            running += rows
        return admitted

    def _start(self, requests: list[Request]) -> list[tuple[list[Request], DecodeState]]:
        """Encode (one encoder call per encoder and input shape), prefill (one forward per layout and
        text length) and choose the first tokens of new requests; returns the still running ones,
        as (requests, their rows' state) units."""
        prefixes: dict[Request, Prefix] = {}
        for batch in _grouped(requests, lambda r: (id(r.encoder), tuple(r.media.shape), r.adapter.config.num_features)):
            try:
                num_blocks = batch[0].adapter.config.num_features
                features, cached = self.features.encode(batch[0].encoder, [r.media for r in batch], num_blocks)
            except Exception as exc:  # the failure belongs to these requests only
                _fail(batch, exc)
                continue
            for i, request in enumerate(batch):
                try:
                    prefixes[request] = request.adapter.prefix(features[:, i : i + 1])
                except Exception as exc:  # this request's adapter: the others go on
                    _fail([request], exc)
                    continue
                request.features_cached, request.encoded = cached[i], time.perf_counter()
        units = []
        for batch in _grouped(list(prefixes), lambda r: (r.layout, r.input_ids.shape[1])):
            try:
                for request in batch:
                    request.rule = step_rule(request.options, request.input_ids, request.trace)
                ids = torch.cat([request.input_ids for request in batch])
                logits, state = self.model.prefill(ids, torch.ones_like(ids), Prefix.cat([prefixes[r] for r in batch]))
                rows = _beam_rows(batch, ids.device)
                if len(rows) != len(ids):  # beams: each prompt ran once, its rows are copied now
                    logits = logits.index_select(0, rows)
                    state.reorder(rows)
                keep = self._advance(batch, state, logits)
            except Exception as exc:
                _fail(batch, exc)
                continue
            if keep:
                units.append((keep, state))
        return units

    def _step(self, layout: tuple, units: list[tuple[list[Request], DecodeState]]) -> None:
        """Merge the newcomers' units into the layout's group and run one step of all its rows."""
        with self._lock:
            group = self._groups.pop(layout, None)
        if group is not None:
            units = [(group.requests, group.state)] + units
        requests = [request for unit, _ in units for request in unit]
        try:
            state = DecodeState.cat([state for _, state in units]) if len(units) > 1 else units[0][1]
            if any(_left(request) for request in requests):  # cancelled: their rows go before the step
                requests = self._advance(requests, state, None)
                if not requests:
                    return
            tokens = torch.cat([request.pending for request in requests])
            logits = self.model.step(state, tokens)
            if self.callback is not None:
                self.callback(len(tokens))
            keep = self._advance(requests, state, logits)
        except Exception as exc:
            _fail(requests, exc)
            return
        if keep:
            with self._lock:
                self._groups[layout] = _Group(keep, state)

    def _advance(self, requests: list[Request], state: DecodeState, logits: torch.Tensor | None) -> list[Request]:
        """Apply each request's rule to its rows' `logits` (None: only drop the cancelled), deliver the
        tokens, and reorder `state` to the rows of those still running (beams following their parents);
        returns those."""
        keep, kept, offset, moved = [], [], 0, False  # kept: (first row, order or None) per running request
        for request in requests:
            rows = request.rows
            if logits is None:
                running, order = not _left(request), None
            else:
                running, order = self._choose(request, logits[offset : offset + rows]), request.rule.order
            if running:
                keep.append(request)
                kept.append((offset, rows, order))
            moved = moved or not running or order is not None
            offset += rows
        if keep and moved:  # rows left or beams moved: the state follows (no index built otherwise)
            device = state.text_mask.device
            state.reorder(
                torch.cat(
                    [
                        first + (torch.arange(rows, device=device) if order is None else order)
                        for first, rows, order in kept
                    ]
                )
            )
        return keep

    @staticmethod
    def _choose(request: Request, logits: torch.Tensor) -> bool:
        """Apply the request's rule to its rows' logits and deliver the tokens; False once it has left."""
        if _left(request):
            return False
        try:
            tokens = request.rule.choose(logits)
        except Exception as exc:
            _fail([request], exc)
            return False
        request._put(tokens)
        if request.rule.done:
            request._put(_DONE)
            return False
        request.pending = tokens
        return True


_SCHEDULERS: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for scheduler in list(_SCHEDULERS):
        scheduler.close()


def _left(request: Request) -> bool:
    """Cancelled (the consumer has gone); tells the stream to end if anyone still listens."""
    if request.cancelled.is_set():
        request._put(_DONE)
        return True
    return False


def _beam_rows(requests: list[Request], device: torch.device) -> torch.Tensor:
    """The index expanding the requests' input rows (in order) to their beams' rows."""
    offsets = itertools.accumulate([len(r.input_ids) for r in requests], initial=0)
    return torch.cat(
        [offset + beam_rows(len(r.input_ids), r.options.num_beams, device) for offset, r in zip(offsets, requests)]
    )


def _grouped(requests: list[Request], key: Callable[[Request], object]) -> list[list[Request]]:
    groups: dict[object, list[Request]] = {}
    for request in requests:
        groups.setdefault(key(request), []).append(request)
    return list(groups.values())


def _fail(requests: list[Request], exc: BaseException) -> None:
    log.debug("batched decode failed for %d request(s): %s", len(requests), exc)
    for request in requests:
        request._put(exc)

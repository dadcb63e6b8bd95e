"""The decode engine: the one place that prefills, expands beams, steps, chooses tokens and finishes
requests, for one shared LM.

Decoding one row reads every weight of the LM once per token; so does decoding eight rows. An
`Engine` is synchronous: `add(request)` queues a request, and each `step()` prefills the newcomers (one
forward per injection layout and text length, each prompt once however many beams it has) and
chooses their first tokens, then runs one decode step of every running row together, applies each
request's own rule from `epalm.decoding` (greedy, sampling or 4.24 beam search) to its rows' logits,
delivers the tokens, and drops the requests that finished or were cancelled. Rows of different
tasks, adapters, decoding settings and text lengths share a step (each row keeps its own injected
features and soft prompt), so each request gets the ids it would get alone; rows whose injection
layouts differ (another start/end layer, prompt length or feature count) step as separate groups.

A request alone is a batch of one (`decode_alone`, run inline; `generate` collects its ids);
`epalm.serving.Scheduler` is a thread and an admission policy around the same engine. A failure
reaches the requests it concerns (a bad rule: its request; a failed forward: its group), never the others.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .config import MAX_BATCH_ROWS
from .decoding import DecodingOptions, GenerationOutput, StepCallback, StepRule, Trace, beam_rows, step_rule
from .model import EPALM, DecodeState, Prefix

log = logging.getLogger(__name__)

Listener = Callable[["torch.Tensor | BaseException | None"], None]
"""Hears a request's progress: each step's tokens ([rows]), then None when it has finished (or left),
or the exception that ended it. Called on the thread that runs the engine."""


@dataclass(eq=False)
class Request:
    """One decode: the prompt ids of one or more inputs (their rows padded alike, `attention_mask`
    saying where), their prefix (injected features and soft prompt), and how to decode them."""

    prefix: Prefix
    input_ids: torch.Tensor  # [B, T]
    options: DecodingOptions
    attention_mask: torch.Tensor | None = None  # [B, T]; None: no padding
    trace: Trace | None = None
    listener: Listener | None = None
    rule: StepRule = field(init=False)
    cancelled: threading.Event = field(default_factory=threading.Event, init=False)
    finished: bool = field(default=False, init=False)  # done, cancelled or failed: it has left the engine
    error: BaseException | None = field(default=None, init=False)
    pending: torch.Tensor | None = field(default=None, init=False)  # tokens to feed at the next step

    def __post_init__(self) -> None:
        if self.attention_mask is None:
            self.attention_mask = torch.ones_like(self.input_ids)
        self.rule = step_rule(self.options, self.input_ids, self.trace)

    @property
    def rows(self) -> int:
        return self.options.num_beams * len(self.input_ids)

    @property
    def layout(self) -> tuple:
        return self.prefix.injection.layout

    def cancel(self) -> None:
        """Leave the engine at its next step (thread-safe)."""
        self.cancelled.set()

    def result(self) -> GenerationOutput:
        """The whole output, as the original `generate` returned it (input ids, then new ids)."""
        if self.error is not None:
            raise self.error
        return self.rule.result()

    def _tell(self, event: torch.Tensor | BaseException | None) -> None:
        if event is None or isinstance(event, BaseException):
            self.finished = True
            self.error = event if isinstance(event, BaseException) else None
        if self.listener is not None:
            self.listener(event)


@dataclass
class _Group:
    """Running requests of one injection layout; `state` holds their rows in order."""

    requests: list[Request]
    state: DecodeState


class Engine:
    """Decodes the requests added to it, all at once, one `step()` at a time (see the module docstring)."""

    def __init__(self, model: EPALM, callback: Callable[[int], None] | None = None) -> None:
        """`callback`, if given, hears the rows of each batched decode step (before its tokens are delivered)."""
        self.model, self.callback = model, callback
        self._new: list[Request] = []
        self._groups: dict[tuple, _Group] = {}
        self._held: list[Request] = []  # every request added and not finished, in or between its steps

    def add(self, request: Request) -> None:
        """Queue a request: it is prefilled at the next step (not thread-safe: the engine's thread calls it)."""
        self._new.append(request)
        self._held.append(request)

    @property
    def rows(self) -> int:
        """Rows decoding now (not counting the requests added since the last step)."""
        return sum(len(group.state.text_mask) for group in list(self._groups.values()))  # a copy: read by others

    @property
    def requests(self) -> list[Request]:
        """Every request the engine holds: added or running (a copy: other threads read it)."""
        return list(self._held)

    def step(self) -> None:
        """Prefill the newcomers and choose their first tokens, then one decode step of every running
        row; the finished requests leave."""
        new, self._new = self._new, []
        units = self._prefill([request for request in new if not _left(request) and self._fits(request)])
        for layout in {requests[0].layout for requests, _ in units} | set(self._groups):
            self._step(layout, [unit for unit in units if unit[0][0].layout == layout])
        self._held = [request for request in self._held if not request.finished]

    def _fits(self, request: Request) -> bool:
        """Whether the request's prefix and ids fit this LM; one that does not fails alone, before it could
        fail the forward it would share."""
        config, prefix = self.model.config, request.prefix
        shapes = (prefix.visual.shape[1:], prefix.prompt.shape[0], prefix.prompt.shape[-1], request.input_ids.shape)
        wanted = ((len(request.input_ids), config.hidden_size), len(request.input_ids), config.word_embed_proj_dim)
        fits = shapes[:3] == wanted and request.attention_mask.shape == request.input_ids.shape
        if fits and prefix.injection.end_layer <= config.num_hidden_layers:
            return True
        fail([request], ValueError(f"the request does not fit the language model (prefix, ids: {shapes})"))
        return False

    def _prefill(self, requests: list[Request]) -> list[tuple[list[Request], DecodeState]]:
        """One forward per layout and text length; each prompt runs once and its cache is copied to
        its beams. Returns the still running requests as (requests, their rows' state) units."""
        units = []
        for batch in _grouped(requests, lambda r: (r.layout, r.input_ids.shape[1])):
            try:
                ids = torch.cat([request.input_ids for request in batch])
                mask = torch.cat([request.attention_mask for request in batch])
                logits, state = self.model.prefill(ids, mask, Prefix.cat([request.prefix for request in batch]))
                rows = _beam_rows(batch, ids.device)
                if len(rows) != len(ids):  # beams: each prompt ran once, its rows are copied now
                    logits = logits.index_select(0, rows)
                    state.reorder(rows)
                keep = self._advance(batch, state, logits)
            except Exception as exc:
                fail(batch, exc)
                continue
            if keep:
                units.append((keep, state))
        return units

    def _step(self, layout: tuple, units: list[tuple[list[Request], DecodeState]]) -> None:
        """Merge the newcomers' units into the layout's group and run one step of all its rows."""
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
            fail(requests, exc)
            return
        if keep:
            self._groups[layout] = _Group(keep, state)

    def _advance(self, requests: list[Request], state: DecodeState, logits: torch.Tensor | None) -> list[Request]:
        """Apply each request's rule to its rows' `logits` (None: only drop the cancelled), deliver the
        tokens, and reorder `state` to the rows of those still running (beams following their parents);
        returns those."""
        keep, kept, offset, moved = [], [], 0, False  # kept: (first row, rows, order or None) per running request
        for request in requests:
            rows = request.rows
            if logits is None:
                running, order = not _left(request), None
            else:
                running, order = _choose(request, logits[offset : offset + rows]), request.rule.order
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


def admit(engine: Engine, waiting: list[Request], max_rows: int) -> None:
    """Move the waiting requests that fit under `max_rows` into the engine, first come first served; a
    request larger than the limit runs alone. Cancelled ones leave the queue, told so."""
    for request in [r for r in waiting if r.cancelled.is_set()]:
        waiting.remove(request)
        request._tell(None)
    running = engine.rows
    while waiting:
        rows = waiting[0].rows
        if running + rows > max_rows and (running or engine.requests):
            return
        engine.add(waiting.pop(0))
        running += rows


def decode_together(model: EPALM, requests: list[Request], max_rows: int = MAX_BATCH_ROWS) -> None:
    """Decode `requests` together, inline, at most `max_rows` rows a step (the others wait their turn);
    each gets the ids it would get alone (`Request.result()`)."""
    engine, waiting = Engine(model), list(requests)
    while waiting or engine.requests:
        admit(engine, waiting, max_rows)
        with torch.inference_mode():
            engine.step()


def decode_alone(model: EPALM, request: Request) -> Iterator[torch.Tensor]:
    """Decode one request as a batch of its own, inline: yields each step's tokens ([rows]) as they are
    chosen. Closing the iterator cancels the request; a failure is raised here. Each step runs in
    inference mode on its own, so the consumer may resume the iterator from any thread."""
    events: list[torch.Tensor | BaseException | None] = []
    request.listener = events.append
    engine = Engine(model)
    engine.add(request)
    try:
        while not request.finished:
            with torch.inference_mode():
                engine.step()
            for event in events:
                if isinstance(event, BaseException):
                    raise event
                if event is not None:
                    yield event
            events.clear()
    finally:
        request.cancel()  # a no-op once finished; otherwise the consumer has gone


def generate(
    model: EPALM,
    prefix: Prefix,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    options: DecodingOptions,
    callback: StepCallback | None = None,
    trace: Trace | None = None,
) -> GenerationOutput:
    """Decode a batch of inputs alone (greedy, sampling or beam search); ids as the original returns them
    (inputs included). `callback`, if given, hears each step's tokens (`decoding.StepCallback`)."""
    request = Request(prefix, input_ids, options, attention_mask, trace)
    for tokens in decode_alone(model, request):
        if callback is not None:
            callback(tokens)
    return request.result()


def _choose(request: Request, logits: torch.Tensor) -> bool:
    """Apply the request's rule to its rows' logits and deliver the tokens; False once it has left."""
    if _left(request):
        return False
    try:
        tokens = request.rule.choose(logits)
    except Exception as exc:
        fail([request], exc)
        return False
    request._tell(tokens)
    if request.rule.done:
        request._tell(None)
        return False
    request.pending = tokens
    return True


def _left(request: Request) -> bool:
    """Cancelled (its consumer has gone): it is told so once and leaves."""
    if request.cancelled.is_set() and not request.finished:
        request._tell(None)
    return request.cancelled.is_set()


def fail(requests: list[Request], exc: BaseException) -> None:
    """Give `exc` to each of `requests` that has not finished."""
    log.debug("decoding failed for %d request(s): %s", len(requests), exc)
    for request in requests:
        if not request.finished:
            request._tell(exc)


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

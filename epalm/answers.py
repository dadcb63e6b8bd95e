"""What a request gives back: `Status` events while there is no answer to show, then `Answer`s
(partial, then final) with their `Timings`; and the `Observer` that hears where its time went.

Light to import: nothing here runs a model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .inspection import Inspection

Observer = Callable[[str, float], None]
"""Hears where a request's time went, phase by phase, as wall seconds: "media" (the file decoded and
prepared), "load" (waiting for models), "encode" (waiting for and running the encoder), "decode"
(start of decoding to the final answer); and, within those, `inspect=True`'s own work: "inspect_media"
(the viewable copy of what the encoder saw) and "inspect_decode" (the per-step trace, the prompt, the
token probabilities and beams). Called on the thread that did the work."""


@dataclass
class Timings:
    """Where the time of one answer went, as of the answer it belongs to."""

    media_s: float = 0.0  # the file decoded and prepared for the encoder
    encode_s: float = 0.0  # the encoder (waiting for it included), and the adapter
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
        encoder = "encoder features reused" if self.features_cached else f"encoder {self.encode_s:.2f} s"
        inputs = f"media {self.media_s:.2f} s · {encoder}"
        if self.first_token_s is None:  # beam search: no token is final before the search ends
            return f"{inputs} · {self.num_beams}-beam search: {tokens}"
        return f"{inputs} · first token {self.first_token_s:.2f} s · {tokens}"


@dataclass
class Status:
    """What a request is doing while there is no answer to show yet, for people: `stage` is "loading"
    (models: their stages and download bytes, whoever started the load), "encoding" or "decoding"
    (beam search, which shows its best beam so far); `eta_s`: the seconds it should still take, where
    known."""

    stage: str
    message: str
    eta_s: float | None = None

    def __str__(self) -> str:
        return self.message + (f" (about {seconds_text(self.eta_s)} left)" if self.eta_s and self.eta_s >= 1 else "")


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


Event = Status | Answer


def answers(events: Iterator[Event]) -> Iterator[Answer]:
    """The answers of a stream, partial then final, without its `Status` events (for a caller that
    shows no progress)."""
    return (event for event in events if isinstance(event, Answer))


def last(events: Iterator[Event]) -> Answer:
    final = None
    for final in events:  # noqa: B007 (keeps the last one)
        pass
    return final


class Clock:
    """Times a request's phases for its `Observer` (and for its `Timings`)."""

    def __init__(self, observer: Observer | None) -> None:
        self.observer = observer

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[Callable[[], float]]:
        started, ended = time.perf_counter(), None

        def spent() -> float:
            return (ended or time.perf_counter()) - started

        try:
            yield spent
        finally:
            ended = time.perf_counter()
            if self.observer is not None:
                self.observer(phase, ended - started)

    def wrap(self, phase: str, function: Callable) -> Callable:
        """`function`, its every call timed as `phase`."""
        if self.observer is None:
            return function

        def timed(*args: Any) -> Any:
            with self(phase):
                return function(*args)

        return timed


def seconds_text(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"

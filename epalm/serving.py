"""Continuous batching: many users' requests decoded together through one shared LM.

A `Scheduler` is a thread and an admission policy around one `epalm.engine.Engine`: a request joins
the batch at the next step after it arrives, if its rows fit under `max_rows` (first come, first
served; one request larger than the limit runs alone), and leaves when it finishes or is cancelled.
Requests arrive encoded: their media went through the encoder on the submitting thread
(`encoders.FeatureCache.features`, where requests waiting for the same encoder are encoded together),
so a newcomer's encoder never stalls the streams already running. The thread runs while there is
work and exits when there is none.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterator

import torch

from .config import MAX_BATCH_ROWS
from .engine import Engine, Request, admit, fail
from .model import EPALM

log = logging.getLogger(__name__)


class Scheduler:
    """Steps every admitted request of one LM together (see the module docstring)."""

    def __init__(self, model: EPALM, max_rows: int = MAX_BATCH_ROWS, callback: Callable[[int], None] | None = None):
        """`callback`, if given, hears the rows of each batched step (before the step's tokens are delivered)."""
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.max_rows = max_rows
        self.engine = Engine(model, callback)
        self._waiting: list[Request] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        _SCHEDULERS.add(self)

    @property
    def callback(self) -> Callable[[int], None] | None:
        return self.engine.callback

    @callback.setter
    def callback(self, callback: Callable[[int], None] | None) -> None:
        self.engine.callback = callback

    @property
    def rows(self) -> int:
        """Rows in the running batch now."""
        return self.engine.rows

    def submit(self, request: Request) -> Iterator[torch.Tensor]:
        """Queue `request` (it joins the batch at the next step) and return its tokens ([rows] per step)
        as the batch produces them. Closing the iterator cancels the request; its failure is raised."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        request.listener = events.put
        with self._lock:
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="epalm-scheduler", daemon=True)
                self._thread.start()
        return _tokens(request, events)

    def close(self, timeout: float = 30.0) -> None:
        """Cancel every request and wait for the thread to end (done at exit: a thread stopped in the
        middle of a step by the interpreter's shutdown aborts the process)."""
        with self._lock:
            requests, thread = self._waiting + self.engine.requests, self._thread
        for request in requests:
            request.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._admit():
                    self.engine.step()
        except BaseException as exc:  # a bug outside a group's step: nobody may wait forever
            with self._lock:  # (a new engine before a newcomer can start a thread on the old one)
                stranded, self._waiting, self._thread = self._waiting + self.engine.requests, [], None
                self.engine = Engine(self.engine.model, self.engine.callback)
            log.exception("the batch scheduler failed; its %d request(s) get the error", len(stranded))
            fail(stranded, exc)  # (those that finished keep their answers)

    def _admit(self) -> bool:
        """Move the waiting requests that fit into the engine; False (the thread ends) when there is
        nothing left to do."""
        with self._lock:
            admit(self.engine, self._waiting, self.max_rows)
            if not self.engine.requests:
                self._thread = None
                return False
            return True


def _tokens(request: Request, events: queue.SimpleQueue) -> Iterator[torch.Tensor]:
    try:
        while True:
            event = events.get()
            if isinstance(event, BaseException):
                raise event
            if event is None:
                return
            yield event
    finally:
        request.cancel()  # a no-op once finished; otherwise the consumer has gone


_SCHEDULERS: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for scheduler in list(_SCHEDULERS):
        scheduler.close()

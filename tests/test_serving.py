"""Continuous batching: every request's ids equal decoding it alone, whatever it shares a step with."""

from __future__ import annotations

import threading

import pytest
import torch

from epalm.decoding import DecodingOptions
from epalm.engine import Request, generate
from epalm.model import EPALM, InjectionConfig
from epalm.serving import Scheduler
from epalm.tiny import tiny_adapter, tiny_encoder, tiny_lm

LATE_RECOMPUTED = InjectionConfig(start_layer=1, end_layer=3, num_features=2, prompt_len=3)  # layers >= 3 re-run
MEDIA = {"image": (3, 224, 224), "audio": (1024, 128)}
GREEDY = DecodingOptions(num_beams=1, max_length=None, max_new_tokens=9)
BEAMS = DecodingOptions(num_beams=3, max_length=None, max_new_tokens=7)
SAMPLING = DecodingOptions(
    num_beams=1, do_sample=True, temperature=0.8, top_p=0.9, seed=5, max_length=None, max_new_tokens=8
)


@pytest.fixture(scope="module")
def parts():
    encoders = {modality: tiny_encoder(modality, seed=1) for modality in MEDIA}
    adapters = {
        "caption": tiny_adapter(seed=1),
        "vqa": tiny_adapter(seed=2),
        "late": tiny_adapter(LATE_RECOMPUTED, seed=3),
    }
    return EPALM(tiny_lm(seed=4)), encoders, adapters


def media(modality: str, seed: int) -> torch.Tensor:
    return torch.randn(MEDIA[modality], generator=torch.Generator().manual_seed(seed))


def text(length: int, seed: int) -> torch.Tensor:
    ids = torch.randint(4, 400, (1, length), generator=torch.Generator().manual_seed(seed))
    ids[0, 0] = 2
    return ids


# (modality, adapter, text length, options): tasks, adapters, layouts, lengths and decodings mixed
JOBS = [
    ("image", "caption", 1, GREEDY),
    ("image", "vqa", 6, BEAMS),
    ("audio", "caption", 1, BEAMS),
    ("audio", "vqa", 4, GREEDY),
    ("image", "late", 3, GREEDY),
    ("image", "caption", 5, SAMPLING),
    ("audio", "late", 1, BEAMS),
    ("image", "vqa", 6, DecodingOptions(num_beams=2, max_length=14)),
]


def prefix_of(parts, job, seed, media_seed=None):
    _, encoders, adapters = parts
    modality, name, _, _ = job
    adapter = adapters[name]
    pixels = media(modality, seed if media_seed is None else media_seed)
    with torch.inference_mode():
        return adapter.prefix(encoders[modality](pixels[None], adapter.config.num_features))


def alone(parts, job, seed, media_seed=None):
    _, _, length, options = job
    ids = text(length, seed)
    with torch.inference_mode():
        return generate(parts[0], prefix_of(parts, job, seed, media_seed), ids, None, options).sequences


class Submitted:
    """A request in the scheduler and its stream of tokens."""

    def __init__(self, scheduler: Scheduler, request: Request) -> None:
        self.request, self.stream = request, scheduler.submit(request)

    @property
    def rows(self) -> int:
        return self.request.rows

    def result(self):
        for _ in self.stream:
            pass
        return self.request.result()


def submit(scheduler, parts, job, seed, media_seed=None) -> Submitted:
    _, _, length, options = job
    return Submitted(scheduler, Request(prefix_of(parts, job, seed, media_seed), text(length, seed), options))


def test_mixed_requests_get_the_ids_they_get_alone_even_joining_mid_flight(parts):
    steps: list[int] = []
    entered, gate = threading.Event(), threading.Event()

    def step(rows: int) -> None:  # the first request's first step waits until the others are queued
        steps.append(rows)
        entered.set()
        gate.wait(10)

    scheduler = Scheduler(parts[0], max_rows=64, callback=step)
    expected = [alone(parts, job, seed) for seed, job in enumerate(JOBS)]
    first = submit(scheduler, parts, JOBS[0], 0)
    assert entered.wait(10)
    later = [submit(scheduler, parts, job, seed) for seed, job in enumerate(JOBS) if seed]
    gate.set()
    results = [first.result().sequences] + [request.result().sequences for request in later]
    for seed, (got, want) in enumerate(zip(results, expected)):
        assert torch.equal(got, want), f"job {seed} {JOBS[seed][1:]}"
    assert steps[0] == first.rows and steps[1] > first.rows, "the others joined its second step"
    assert scheduler.rows == 0


def test_a_beam_request_runs_its_prompt_once(parts, monkeypatch):
    lm = parts[0]
    jobs = [JOBS[1], JOBS[7]]  # 3 and 2 beams, one layout and text length
    expected = [alone(parts, job, 1) for job in jobs]
    widths, prefill = [], lm.prefill
    monkeypatch.setattr(lm, "prefill", lambda ids, *a: widths.append(len(ids)) or prefill(ids, *a))
    scheduler = Scheduler(lm)
    requests = [submit(scheduler, parts, job, 1) for job in jobs]
    for want, request in zip(expected, requests):
        assert torch.equal(request.result().sequences, want)
    assert sum(widths) == len(jobs), f"prefill rows {widths}: one per request, not one per beam"


def test_streamed_tokens_are_the_final_ids(parts):
    scheduler = Scheduler(parts[0])
    request = submit(scheduler, parts, JOBS[3], 3)
    streamed = torch.stack(list(request.stream), dim=1)
    assert torch.equal(streamed, alone(parts, JOBS[3], 3)[:, JOBS[3][2] :])


def test_rows_limit_queues_requests_and_still_gives_their_ids(parts):
    steps: list[int] = []
    scheduler = Scheduler(parts[0], max_rows=4, callback=steps.append)
    jobs = [JOBS[1], JOBS[2], JOBS[0], JOBS[3]]  # 3 + 3 + 1 + 1 rows
    requests = [submit(scheduler, parts, job, seed) for seed, job in enumerate(jobs)]
    for seed, (job, request) in enumerate(zip(jobs, requests)):
        assert torch.equal(request.result().sequences, alone(parts, job, seed))
    assert max(steps) <= 4


def test_a_request_larger_than_the_rows_limit_runs_alone(parts):
    steps: list[int] = []
    scheduler = Scheduler(parts[0], max_rows=2, callback=steps.append)
    jobs = [JOBS[1], JOBS[0]]  # 3 beams (over the limit of 2), then 1 row
    requests = [submit(scheduler, parts, job, seed) for seed, job in enumerate(jobs)]
    for seed, (job, request) in enumerate(zip(jobs, requests)):
        assert torch.equal(request.result().sequences, alone(parts, job, seed))
    assert 3 in steps and set(steps) <= {1, 3}, f"rows per step {steps}: the 3-beam request never shared a step"


def test_a_cancelled_request_leaves_at_the_next_step_and_frees_its_rows(parts):
    entered, gate, steps = threading.Event(), threading.Event(), []
    long = DecodingOptions(num_beams=1, max_length=None, max_new_tokens=60)

    def callback(rows: int) -> None:
        steps.append(rows)
        if len(steps) == 1:  # hold the first step until the consumer has gone
            entered.set()
            assert gate.wait(10)

    scheduler = Scheduler(parts[0], callback=callback)
    leaving = submit(scheduler, parts, ("image", "caption", 1, long), 0)
    staying = submit(scheduler, parts, ("audio", "vqa", 2, BEAMS), 1)
    stream = leaving.stream
    next(stream)  # the prefill's token
    assert entered.wait(10)
    stream.close()
    gate.set()
    want = alone(parts, ("audio", "vqa", 2, BEAMS), 1)
    assert torch.equal(staying.result().sequences, want)
    assert steps[0] in (1, 4), "the leaving request decoded (alone or with the other)"
    assert set(steps[1:]) == {3}, "the next steps hold only the remaining request's rows and cache"
    assert scheduler.rows == 0


def test_a_request_cancelled_while_waiting_never_starts(parts):
    gate, steps = threading.Event(), []

    def callback(rows: int) -> None:
        steps.append(rows)
        assert gate.wait(10)  # the first request holds the only place until the second is cancelled

    scheduler = Scheduler(parts[0], max_rows=1, callback=callback)
    running = submit(scheduler, parts, JOBS[0], 0)
    waiting = submit(scheduler, parts, JOBS[3], 3)
    waiting.request.cancel()
    gate.set()
    assert list(waiting.stream) == [] and waiting.request.finished and waiting.request.pending is None
    assert torch.equal(running.result().sequences, alone(parts, JOBS[0], 0)) and set(steps) == {1}


@pytest.mark.parametrize("broken", ["prefix", "rule"])
def test_a_failing_request_fails_alone_among_those_prefilled_with_it(parts, broken):
    """A request whose prefix does not fit the LM, or whose rule fails, gets the error; those prefilled and
    stepped with it get their own ids."""
    gate, entered = threading.Event(), threading.Event()
    scheduler = Scheduler(parts[0], callback=lambda rows: entered.set() or gate.wait(10))
    first = submit(scheduler, parts, JOBS[3], 3)  # holds the thread at its first step: the next two join together
    assert entered.wait(10)
    good = submit(scheduler, parts, JOBS[0], 0)
    bad = Request(prefix_of(parts, JOBS[0], 1), text(1, 1), GREEDY)
    if broken == "prefix":
        bad.prefix.visual = bad.prefix.visual[..., :5]
    else:
        bad.rule.choose = lambda logits: (_ for _ in ()).throw(RuntimeError("broken rule"))
    bad_stream = scheduler.submit(bad)
    gate.set()
    with pytest.raises((ValueError, RuntimeError), match="does not fit the language model|broken rule"):
        list(bad_stream)
    assert torch.equal(good.result().sequences, alone(parts, JOBS[0], 0))
    assert torch.equal(first.result().sequences, alone(parts, JOBS[3], 3))


@pytest.mark.parametrize("broken", ["_admit", "callback"])
def test_a_bug_fails_the_requests_it_reaches_instead_of_hanging_and_the_scheduler_goes_on(parts, broken):
    """A bug in admission reaches the thread's own catch (every request waiting or running gets the error);
    a failing step hook fails that step's group."""
    scheduler = Scheduler(parts[0])

    def bug(*args: object) -> None:
        raise RuntimeError(f"bug in {broken}")

    original = getattr(scheduler, broken)
    setattr(scheduler, broken, bug)
    requests = [submit(scheduler, parts, job, seed) for seed, job in enumerate(JOBS[:3])]
    for request in requests:
        with pytest.raises(RuntimeError, match=f"bug in {broken}"):
            request.result()
    setattr(scheduler, broken, original)
    assert torch.equal(submit(scheduler, parts, JOBS[0], 0).result().sequences, alone(parts, JOBS[0], 0))


def test_close_cancels_what_runs_and_ends_the_thread(parts):
    """At exit the scheduler is closed: a thread stopped mid-step by the shutdown would abort the process."""
    entered, gate = threading.Event(), threading.Event()
    scheduler = Scheduler(parts[0], callback=lambda rows: entered.set() or gate.wait(10))
    long = DecodingOptions(num_beams=1, max_length=None, max_new_tokens=200)
    submitted = submit(scheduler, parts, ("image", "caption", 1, long), 0)
    next(submitted.stream)
    assert entered.wait(10)  # the thread is in a step
    closing = threading.Thread(target=scheduler.close)
    closing.start()
    while not submitted.request.cancelled.is_set():
        closing.join(0.01)
    gate.set()
    closing.join(10)
    assert len(list(submitted.stream)) < 5 and scheduler._thread is None

"""`epalm eval`: a task's predictions on a benchmark's own files, scored by the benchmark's rules.

    python -m epalm eval image-caption --annotations dataset_coco.json --media coco/images --out runs/caption
    python -m epalm eval image-vqa --annotations v2_mscoco_val2014_annotations.json \\
        --questions v2_OpenEnded_mscoco_val2014_questions.json --media coco/val2014 --out runs/vqa --ray

Every request goes through `predict`, the one place that submits work to a `Pipeline`: from a pool
of threads, so that the pipeline's scheduler decodes them together and their media are read and
decoded in parallel. Each answer is appended to `OUT/predictions.jsonl` as it comes; a re-run with
the same settings skips the items already answered (and retries those that failed). With `--ray`
the same requests are sharded across Ray workers (`epalm.scale`), one pipeline each, and the
answers gathered into the same file. At the end `OUT/predictions.json` holds the official results
format, `OUT/metrics.json` the scores, and the table printed puts them beside the paper's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .benchmarks import Benchmark, Key, read_benchmark
from .errors import UserError

log = logging.getLogger(__name__)
PREDICTIONS_LOG = "predictions.jsonl"
RUN_FILE = "run.json"


class EvaluationError(UserError, ValueError):
    """An evaluation that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class Request:
    """One caption or answer to produce: its key, its media (a path, or a file's bytes) and question."""

    key: Key
    media: Any
    question: str | None = None


@dataclass(frozen=True)
class Prediction:
    key: Key
    answer: str | None = None  # the caption or answer
    error: str | None = None  # why there is no answer


def predict(pipeline: Any, task: str, requests: Iterable[Request], decoding: dict[str, Any]) -> Iterator[Prediction]:
    """The predictions of `requests` for `task`, as they complete: the one function that submits work.

    Enough requests are in flight at once (from a thread pool) to fill the pipeline's batch twice
    over: those decoding share the LM's steps while the others read and decode their media and run
    their encoder. A request that fails (a bad file, a question too long) gives its error, not an
    exception. `decoding`: `Pipeline.stream` keyword arguments (preset, max_new_tokens, num_beams...)."""
    spec = pipeline.task(task)
    options = pipeline.decoding_options(
        spec, decoding.get("preset"), **{k: v for k, v in decoding.items() if k != "preset"}
    )
    in_flight = 2 * max(1, pipeline.max_batch_rows // options.num_beams) if pipeline.batching else 2

    def answer(request: Request) -> Prediction:
        try:
            final = None
            for final in pipeline.stream(request.media, task, request.question, **decoding):  # noqa: B007
                pass
            return Prediction(request.key, final.text)
        except UserError as exc:
            return Prediction(request.key, error=str(exc))
        except Exception as exc:  # one item's unforeseen failure must not stop the others
            log.info("unexpected failure on %r", request.key, exc_info=True)
            return Prediction(request.key, error=f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(in_flight, thread_name_prefix="epalm-predict") as pool:
        pending: set[Future] = set()
        for request in requests:
            if len(pending) >= in_flight:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in finished)
            pending.add(pool.submit(answer, request))
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (future.result() for future in finished)


class PredictionLog:
    """A JSONL file of predictions, one line each, appended and flushed as they come; read back on a
    re-run. A later line for a key replaces an earlier one (a failure retried)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[Key, Prediction] = {}
        if path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = Prediction(entry["key"], entry.get("answer"), entry.get("error"))
                except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short when a run was killed
                    log.warning("%s:%d: unreadable line skipped", path, number)

    @property
    def done(self) -> dict[Key, str]:
        return {key: p.answer for key, p in self.entries.items() if p.answer is not None}

    def add(self, predictions: Iterable[Prediction]) -> Iterator[Prediction]:
        """Append each prediction as it arrives (and pass it on)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut = False  # a killed run's last line, cut short: the next line starts after it, not on it
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb") as existing:
                existing.seek(-1, os.SEEK_END)
                cut = existing.read(1) != b"\n"
        with self.path.open("a") as out:
            if cut:
                out.write("\n")
            for prediction in predictions:
                entry = {k: v for k, v in asdict(prediction).items() if v is not None}
                out.write(json.dumps(entry) + "\n")
                out.flush()
                self.entries[prediction.key] = prediction
                yield prediction


@dataclass(frozen=True)
class Runner:
    """Where predictions are made: one process (`ray` None), or a Ray cluster ("local" starts one
    here; else the address of a running one) with `workers` pipelines. `pipeline` holds the
    `Pipeline` keyword arguments, the same in every worker."""

    pipeline: dict[str, Any]
    ray: str | None = None
    workers: int | None = None

    def run(self, task: str, requests: list[Request], decoding: dict[str, Any]) -> Iterator[Prediction]:
        if not requests:
            return
        if self.ray is None:
            from .pipeline import Pipeline

            yield from predict(Pipeline(**self.pipeline), task, requests, decoding)
            return
        from .scale import ray_predict

        yield from ray_predict(requests, task, decoding, self.pipeline, self.ray, self.workers)


@dataclass
class EvalResult:
    benchmark: Benchmark
    metrics: dict[str, float]
    predicted: int
    failed: dict[Key, str] = field(default_factory=dict)  # key -> error
    notes: list[str] = field(default_factory=list)
    table: str = ""


def evaluate(
    task: str,
    annotations: str | Path,
    media: str | Path,
    out: str | Path,
    runner: Runner,
    questions: str | Path | None = None,
    image_pattern: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    decoding: dict[str, Any] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Predict `task` on the benchmark in `annotations` (skipping what `out` already holds), then
    write the official results and the scores to `out` and build the table."""
    from .tasks import get_task

    decoding = {k: v for k, v in (decoding or {}).items() if v is not None}
    registry = runner.pipeline.get("registry")
    spec = get_task(task, registry) if registry is not None else get_task(task)
    benchmark = read_benchmark(annotations, media, questions, image_pattern, split)
    _check_fits(spec, benchmark)
    if limit is not None:
        if limit < 1:
            raise EvaluationError("--limit must be at least 1")
        benchmark.items = benchmark.items[:limit]
    out = Path(out).expanduser()
    _check_media(benchmark)
    _check_run(out, task, annotations, questions, image_pattern, split, decoding, runner)
    predictions = PredictionLog(out / PREDICTIONS_LOG)
    done = predictions.done
    todo = [Request(i.key, str(i.media), i.question) for i in benchmark.items if i.key not in done]
    if done:
        log.warning(
            "%d of %d items already predicted in %s; predicting the other %d",
            len(benchmark.items) - len(todo),
            len(benchmark.items),
            out,
            len(todo),
        )
    for _ in _progress(predictions.add(runner.run(task, todo, decoding)), len(todo), progress):
        pass
    done = predictions.done  # (built on each read: once here, not per item)
    texts = {i.key: done[i.key] for i in benchmark.items if i.key in done}
    failed = {}
    for item in benchmark.items:
        if item.key not in texts:
            entry = predictions.entries.get(item.key)
            failed[item.key] = entry.error if entry and entry.error else "no prediction"
    (out / "predictions.json").write_text(json.dumps(benchmark.results(texts)))
    scores, notes = benchmark.score(texts)
    notes = benchmark.notes + notes
    if failed:
        notes.append(
            f"{len(failed)} of {len(benchmark.items)} items failed (listed in metrics.json) and score as wrong"
        )
    random = bool(runner.pipeline.get("tiny")) or getattr(runner.pipeline.get("source"), "random_weights", False)
    if random:
        notes.append("random weights (--tiny): the numbers say nothing about eP-ALM")
    result = EvalResult(benchmark, scores, len(texts), failed, notes)
    result.table = table(spec, result)
    record = {
        "task": task,
        "benchmark": benchmark.name,
        "items": len(benchmark.items),
        "predicted": len(texts),
        "failed": {str(k): v for k, v in failed.items()},
        "metrics": scores,
        "paper": _paper(spec),
        "notes": notes,
        "decoding": decoding,
        "random_weights": random,
    }
    (out / "metrics.json").write_text(json.dumps(record, indent=1))
    return result


def _check_fits(spec: Any, benchmark: Benchmark) -> None:
    if spec.kind != benchmark.kind or spec.modality != benchmark.modality:
        what = {"caption": "captions", "qa": "answers to questions"}
        raise EvaluationError(
            f"the annotation file holds {benchmark.name} ({what[benchmark.kind]} about {benchmark.modality}); "
            f"'{spec.id}' writes {what[spec.kind]} about {spec.modality}"
        )


def _models(registry: dict[str, Any] | None, task: str) -> list[str] | None:
    """The LM, encoder and adapter a registry task predicts with, as the run records them."""
    spec = (registry or {}).get(task)
    if spec is None:
        return None
    return [f"{spec.lm.id}@{spec.lm.revision}", f"{spec.encoder.id}@{spec.encoder.revision}", repr(spec.adapter)]


def _check_run(
    out: Path, task: str, annotations: Any, questions: Any, pattern: Any, split: Any, decoding: dict, runner: Runner
) -> None:
    """OUT/run.json records what the predictions in OUT were made with: a re-run must match it."""
    settings = {
        "task": task,
        "annotations": str(Path(annotations).expanduser().resolve()),
        "questions": str(Path(questions).expanduser().resolve()) if questions else None,
        "image_pattern": pattern,
        "split": split,
        "decoding": decoding,
        "tiny": bool(runner.pipeline.get("tiny")),
        "dtype": runner.pipeline.get("dtype"),  # the models: predictions of another dtype or model do not mix
        "models": _models(runner.pipeline.get("registry"), task),
    }
    path = out / RUN_FILE
    if path.is_file() and (out / PREDICTIONS_LOG).is_file():
        before = json.loads(path.read_text())
        changed = [k for k in settings if before.get(k) != settings[k]]
        if changed:
            raise EvaluationError(
                f"{out} holds predictions made with other settings ({', '.join(changed)}): "
                "use another --out, or delete that folder to start again"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def _check_media(benchmark: Benchmark) -> None:
    """Stop at once when none of the first media files is where the file and pattern say (a wrong
    --media or --image-pattern), rather than failing every item."""
    if not any(item.media.is_file() for item in benchmark.items[:50]):
        raise EvaluationError(
            f"no media found: {benchmark.items[0].media} does not exist (nor do the next ones); check --media, or "
            "name the files with --image-pattern"
        )


def _progress(predictions: Iterator[Prediction], total: int, show: bool) -> Iterator[Prediction]:
    if not show:
        return predictions
    from tqdm import tqdm

    return tqdm(predictions, total=total, unit="item", disable=None, desc="predicting")


def _paper(spec: Any) -> dict[str, Any] | None:
    if spec.paper is None:
        return None
    return {"benchmark": spec.paper.benchmark, "metrics": dict(spec.paper.metrics)}


def table(spec: Any, result: EvalResult) -> str:
    """The metrics beside the paper's numbers, then the notes."""
    paper = dict(spec.paper.metrics) if spec.paper else {}
    header = ("metric", "this run", f"paper ({spec.paper.benchmark})" if spec.paper else "paper")
    rows = [header] + [(name, f"{value:.2f}", _cell(paper.get(name))) for name, value in result.metrics.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    bench = result.benchmark
    lines = [f"{spec.id} on {bench.name}: {result.predicted} of {len(bench.items)} items predicted"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def _cell(value: float | str | None) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

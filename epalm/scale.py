"""Scale-out with Ray (`pip install "epalm[scale]"`): requests sharded across workers with Ray Data.

`--ray` starts a Ray cluster on this machine; `--ray ADDRESS` joins a running one (`ray start
--head` on one machine, `ray start --address HEAD:6379` on the others; `auto` finds the local one).
The requests become a Ray Dataset whose blocks stream through a pool of actors, each holding one
`Pipeline` (one GPU each where the cluster has GPUs; otherwise a share of the CPUs), which runs
`evaluation.predict` on its blocks: inside a worker, media are read and decoded by many threads
at once while the pipeline batches their decoding. Predictions stream back to the caller as the
blocks finish, so they reach the same files as in one process. The workers get this `epalm`
package from the caller (`runtime_env` py_modules), so every node runs the same code; its
dependencies (torch, transformers...) must be installed on every node.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError
from .evaluation import Prediction, Request, predict

log = logging.getLogger(__name__)
BATCHES_PER_WORKER = 2  # blocks a worker holds at once: the next one starts while the last finishes


class ScaleError(UserError, RuntimeError):
    """Ray is missing or the cluster cannot be used; the message says what to do."""


class _Worker:
    """A Ray Data actor: one pipeline, predicting the blocks it is given."""

    def __init__(self, task: str, decoding: dict[str, Any], pipeline: dict[str, Any], threads: int) -> None:
        import torch

        from .pipeline import Pipeline

        if threads:
            torch.set_num_threads(threads)
        self.task, self.decoding = task, decoding
        self.pipeline = Pipeline(**pipeline)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        requests = [
            Request(int(index), media if isinstance(media, (str, bytes)) else bytes(media), question or None)
            for index, media, question in zip(batch["index"], batch["media"], batch["question"])
        ]
        found = {p.key: p for p in predict(self.pipeline, self.task, requests, self.decoding)}
        ordered = [found[r.key] for r in requests]
        return {
            "index": [r.key for r in requests],
            "answer": [p.answer or "" for p in ordered],
            "error": [p.error or "" for p in ordered],
        }


def ray_predict(
    requests: list[Request],
    task: str,
    decoding: dict[str, Any],
    pipeline: dict[str, Any],
    address: str = "local",
    workers: int | None = None,
) -> Iterator[Prediction]:
    """The predictions of `requests`, made by `workers` Ray actors (default: one per GPU of the
    cluster, else one per node), as their blocks finish."""
    ray = connect(address, pipeline)
    resources = ray.cluster_resources()
    gpus = 0 if pipeline.get("device") == "cpu" else int(resources.get("GPU", 0))
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    workers = workers or gpus or max(1, nodes)
    if workers < 1:
        raise ScaleError("--workers must be at least 1")
    if gpus and workers > gpus:
        raise ScaleError(f"the cluster has {gpus} GPU(s): at most {gpus} workers, one GPU each")
    cpus = 1 if gpus else max(1, int(resources.get("CPU", 1)) // workers)
    rows = [
        {"index": i, "media": r.media if isinstance(r.media, bytes) else str(r.media), "question": r.question or ""}
        for i, r in enumerate(requests)
    ]
    per_block = max(1, min(64, -(-len(rows) // (workers * BATCHES_PER_WORKER))))
    dataset = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // per_block))
    results = dataset.map_batches(
        _Worker,
        fn_constructor_kwargs={
            "task": task,
            "decoding": decoding,
            "pipeline": {**pipeline, "device": "cuda"} if gpus else pipeline,
            "threads": 0 if gpus else cpus,
        },
        batch_size=per_block,
        batch_format="pandas",  # file bytes stay whole (numpy would strip their trailing zero bytes)
        compute=ray.data.ActorPoolStrategy(
            size=workers,
            max_tasks_in_flight_per_actor=BATCHES_PER_WORKER,
            max_concurrent_calls_per_actor=BATCHES_PER_WORKER,
        ),
        num_gpus=1 if gpus else 0,
        num_cpus=cpus,
    )
    log.info("Ray: %d worker(s) on %d node(s), %s each", workers, nodes, "one GPU" if gpus else f"{cpus} CPU(s)")
    try:
        for row in results.iter_rows():
            request = requests[int(row["index"])]
            yield Prediction(request.key, None if row["error"] else row["answer"], row["error"] or None)
    except ray.exceptions.RayError as exc:  # a worker died (out of memory, a node lost): what came back is kept
        raise ScaleError(f"a Ray worker failed; the answers so far are kept, run again to go on: {exc}") from exc


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ScaleError('--ray needs Ray: pip install "epalm[scale]"') from None
    return ray


def connect(address: str, pipeline: dict[str, Any]) -> Any:
    """Ray, connected: a local cluster started ("local") or the one at `address` joined, its workers
    handed this package (and the one a custom model source comes from, such as the benchmarks' `bench`).
    Once connected, the connection is kept for the process."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    modules = {str(Path(__file__).resolve().parent)}
    source = pipeline.get("source")
    if source is not None:
        top = sys.modules[type(source).__module__.partition(".")[0]]
        modules.update(getattr(top, "__path__", []))
    env: dict[str, Any] = {"py_modules": sorted(modules)}
    try:
        if address == "local":
            ray.init(include_dashboard=False, runtime_env=env, log_to_driver=False)
        else:
            ray.init(address=address, runtime_env=env, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "start Ray here" if address == "local" else f"reach the Ray cluster at {address}"
        raise ScaleError(f"could not {where}: {exc}") from exc
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return ray

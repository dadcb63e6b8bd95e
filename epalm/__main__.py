"""Command line: `python -m epalm {tasks,download,caption,ask,eval,convert,train,parity} ...`.

Several paths make one batch run that loads the models once and prints one line per path, in
input order: `PATH<TAB>answer` or `PATH<TAB>ERROR: message` (or JSON lines with --jsonl). A bad
file never stops the others; the exit status is 0 when every path succeeded and 2 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import UserError
    from .evaluation import Runner
    from .refs import TaskRefs
    from .tasks import Task

# The library (torch, transformers) is imported inside the commands, once the arguments are parsed:
# `--help` and usage errors answer at once.

log = logging.getLogger(__name__)
REGISTRY_HELP = "another task registry file (default: $EPALM_TASKS, else checkpoints/tasks.yaml)"


def _model_flags(parser: argparse.ArgumentParser) -> None:
    from .media import MediaLimits, MiB  # light: no torch
    from .presets import DEFAULT_PRESET, PRESETS  # light too

    max_mib = MediaLimits().max_file_bytes / MiB
    parser.add_argument("--task", help="task id (see `python -m epalm tasks`)")
    parser.add_argument("--adapter", help="a trained adapter instead of --task: its folder or Hub repo id (user/name)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models, no network (answers are meaningless)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto: a GPU if any (default: auto)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU, float16 on GPU)")
    parser.add_argument("--registry", help=REGISTRY_HELP)
    parser.add_argument("--frames", dest="num_frames", type=int, help="video frames to sample (default: the task's)")
    parser.add_argument(
        "--max-file-size", type=float, metavar="MiB", help=f"refuse larger files, in MiB (default: {max_mib:g})"
    )
    parser.add_argument("--jsonl", action="store_true", help="print one JSON object per path (answer and timings)")
    parser.add_argument(
        "--save-inputs",
        type=Path,
        metavar="DIR",
        help="write what the model saw (PNGs) and its prompt, token probabilities and beams (JSON) to DIR/<file name>/",
    )
    parser.add_argument("paths", nargs="*", help="image, video or audio files, or folders of them")
    bulk = parser.add_argument_group("many inputs", "A folder or a Hub dataset, answered into a file (epalm.bulk).")
    bulk.add_argument("--dataset", help="a Hub dataset (or a local dataset folder) instead of paths")
    bulk.add_argument("--split", help="the dataset's split (default: its only one)")
    bulk.add_argument("--column", help="the dataset's media column (default: its image, video or audio column)")
    bulk.add_argument(
        "--out", type=Path, metavar="FILE", help="write the answers to FILE (.jsonl or .parquet); a re-run resumes"
    )
    _scale_flags(bulk)
    decoding = parser.add_argument_group("decoding", "A preset, then any of its settings overridden one by one.")
    decoding.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="; ".join(preset.label for preset in PRESETS.values()) + f" (default: {DEFAULT_PRESET})",
    )
    decoding.add_argument("--beams", dest="num_beams", type=int, help="beam search width, 1 = greedy (paper: 3)")
    decoding.add_argument(
        "--sample", dest="do_sample", action="store_const", const=True, help="sample the next token (needs --beams 1)"
    )
    decoding.add_argument(
        "--temperature", type=float, help="sampling: < 1 sharpens the distribution, > 1 flattens it (default: 1.0)"
    )
    decoding.add_argument(
        "--top-p",
        dest="top_p",
        type=float,
        help="sampling: only the most likely tokens whose probabilities sum to P (default: 1.0, off)",
    )
    decoding.add_argument(
        "--top-k", dest="top_k", type=int, help="sampling: only the K most likely tokens (default: 0, off)"
    )
    decoding.add_argument("--seed", type=int, help="random seed, for repeatable sampling (default: none)")
    decoding.add_argument(
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int,
        help="stop after this many new tokens (instead of counting --max-length)",
    )
    decoding.add_argument(
        "--max-length",
        dest="max_length",
        type=int,
        help="stop at this many input ids + new tokens, as the original counted (paper: 30)",
    )


def build_parser() -> argparse.ArgumentParser:
    prog = "epalm" if Path(sys.argv[0]).stem == "epalm" else "python -m epalm"  # the console script, or -m
    parser = argparse.ArgumentParser(prog=prog, description="eP-ALM: caption or ask about images, video and audio.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    tasks = sub.add_parser("tasks", help="list the tasks and whether their files are cached")
    tasks.add_argument("--registry", help=REGISTRY_HELP)
    down = sub.add_parser("download", help="fetch the files the given tasks need (and only those) into the cache")
    down.add_argument("tasks", nargs="+", metavar="TASK", help="task ids (see `python -m epalm tasks`)")
    down.add_argument("--registry", help=REGISTRY_HELP)
    _model_flags(sub.add_parser("caption", help="caption media files"))
    ask = sub.add_parser("ask", help="answer a question about media files")
    ask.add_argument("--question", "-q", required=True)
    _model_flags(ask)
    _eval_flags(sub.add_parser("eval", help="score a task on a benchmark's own files, beside the paper's numbers"))
    conv = sub.add_parser("convert", help="convert an original .pth adapter to adapter.safetensors + config")
    conv.add_argument("src", type=Path)
    conv.add_argument("out_dir", type=Path)
    conv.add_argument("--task", required=True)
    conv.add_argument("--registry", help=REGISTRY_HELP)
    conv.add_argument("--push-to-hub", metavar="REPO", help="upload the converted folder to this Hub repo")
    _train_flags(sub.add_parser("train", help="train your own adapter on a folder of examples"))
    par = sub.add_parser("parity", help="check against reference fixtures (same as python -m epalm.parity)")
    par.add_argument("cases", nargs="+", help="case folders, or folders of cases (e.g. tests/fixtures/parity)")
    return parser


def _scale_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="shard the work across Ray workers: a cluster started here, or the one at ADDRESS "
        '(pip install "epalm[scale]")',
    )
    parser.add_argument(
        "--workers", type=int, help="Ray workers, one pipeline each (default: one per GPU, else one per node)"
    )


def _eval_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m epalm eval` (epalm.evaluation; the files it reads: epalm.benchmarks)."""
    from .config import MAX_BATCH_ROWS  # light: no torch
    from .presets import PRESETS  # light: no torch

    parser.add_argument("task", help="task id (see `python -m epalm tasks`)")
    parser.add_argument(
        "--annotations",
        required=True,
        type=Path,
        help="the benchmark's own file: COCO captions or Karpathy split, VQAv2 annotations, GQA questions, "
        "MSR-VTT, MSRVTT-QA / MSVD-QA, AudioCaps (JSON or CSV)",
    )
    parser.add_argument("--questions", type=Path, help="VQAv2: its questions file")
    parser.add_argument("--media", required=True, type=Path, help="the folder of the images, videos or audio files")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder: predictions.jsonl (as they come), predictions.json, metrics.json; a re-run resumes",
    )
    parser.add_argument(
        "--image-pattern",
        help='the media file of an item from its fields, e.g. "COCO_val2014_{image_id:012d}.jpg" (default: the '
        "file's own names, or its benchmark's naming)",
    )
    parser.add_argument("--split", help="Karpathy split file, MSR-VTT: the split to read (default: test)")
    parser.add_argument("--limit", type=int, metavar="N", help="the first N items only (smoke runs)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models, no network (numbers are meaningless)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto: a GPU if any (default: auto)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU, float16 on GPU)")
    parser.add_argument("--registry", help=REGISTRY_HELP)
    parser.add_argument(
        "--preset", choices=list(PRESETS), help="decoding preset (default: paper, the task's own settings)"
    )
    parser.add_argument("--beams", dest="num_beams", type=int, help="beam search width (paper: 3)")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="stop after this many new tokens")
    parser.add_argument(
        "--max-batch-rows", type=int, help=f"rows per decode step (default: $EPALM_MAX_BATCH_ROWS, {MAX_BATCH_ROWS})"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _scale_flags(parser)


def _train_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m epalm train`: every `TrainConfig` field a user sets. Their defaults are
    None (not given): the library's own apply (`epalm.recipe.TrainConfig`, the recipe's rule)."""
    from . import recipe as r  # light: no torch
    from .recipe import TrainConfig as C

    parser.add_argument(
        "data", help="a folder of media + metadata.jsonl/csv/parquet (imagefolder convention), or a Hub dataset id"
    )
    parser.add_argument(
        "--base", required=True, help="task whose LM, encoder, settings and recipe to use (python -m epalm tasks)"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder: the adapter (best checkpoint), log.jsonl"
    )
    recipe = parser.add_argument_group("recipe", "Unset values are the recipe's (docs/training.md).")
    recipe.add_argument(
        "--recipe",
        choices=r.RECIPES,
        help="paper: the base task's released recipe as it is; small: sized in steps for small data; "
        f"auto (default): paper when it gives {r.PAPER_MIN_STEPS:,}+ optimizer steps on the data, else small",
    )
    recipe.add_argument("--epochs", type=int)
    recipe.add_argument("--batch-size", type=int, help="per process")
    recipe.add_argument("--lr", type=float, help="learning rate (small recipe: each weight tensor's own by default)")
    recipe.add_argument("--prompt-lr", type=float, help="the soft prompt's learning rate")
    recipe.add_argument("--warmup-lr", type=float, help="paper recipe: where the warm-up starts")
    recipe.add_argument("--min-lr", type=float, help="paper recipe: where the cosine ends")
    recipe.add_argument(
        "--warmup-steps",
        type=int,
        help=f"paper: timm's {r.PAPER_WARMUP_STEPS} warm-up steps; small: {r.WARMUP_FRACTION * 100:g}%% of the steps",
    )
    recipe.add_argument("--weight-decay", type=float, help=f"default: {C.weight_decay:g}")
    recipe.add_argument(
        "--answer-loss-only",
        action=argparse.BooleanOptionalAction,
        help="QA: no loss on the question (paper recipe: off, the original has one; "
        f"small: {'on' if r.SMALL_ANSWER_LOSS_ONLY else 'off'})",
    )
    recipe.add_argument(
        "--schedule-all-groups",
        action="store_const",
        const=True,
        help="paper recipe: the lr schedule moves every group (the original: group 0 only)",
    )
    recipe.add_argument(
        "--dropout",
        action=argparse.BooleanOptionalAction,
        help="the LM in train mode, dropout on (paper recipe: on, as the original; "
        f"small: {'on' if r.SMALL_DROPOUT else 'off'})",
    )
    recipe.add_argument(
        "--init-from-base",
        action=argparse.BooleanOptionalAction,
        help="start from the base task's adapter (default: for small data, when it has one)",
    )
    recipe.add_argument(
        "--validate-every", type=int, metavar="EPOCHS", help=f"paper: 1; small: about {r.VALIDATIONS} validations"
    )
    recipe.add_argument(
        "--patience",
        type=int,
        metavar="N",
        help=f"stop after N validations without improvement (0: never; paper: 0; small: {r.PATIENCE})",
    )
    recipe.add_argument("--seed", type=int, help=f"default: {C.seed}")
    data = parser.add_argument_group("data")
    data.add_argument("--split", help="the dataset's training split (default: train)")
    data.add_argument("--media-column", help="default: file_name (folders), the image/audio/video column (datasets)")
    data.add_argument("--text-column", help=f"captions (default: {C.text_column})")
    data.add_argument("--question-column", help=f"default: {C.question_column}")
    data.add_argument("--answer-column", help=f"default: {C.answer_column}")
    data.add_argument(
        "--validation-fraction",
        type=float,
        help=f"held out when the data has no validation split (default: {C.validation_fraction:g})",
    )
    data.add_argument(
        "--refuse-bad",
        dest="skip_bad",
        action="store_const",
        const=False,
        help="stop on any bad row instead of skipping it",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--resume", action="store_const", const=True, help="continue the interrupted run of --out")
    run.add_argument(
        "--overwrite", action="store_const", const=True, help="replace the adapter in --out when this run finishes"
    )
    run.add_argument("--device", help="cpu, or auto (default: accelerate's device; its launcher's for many GPUs)")
    run.add_argument("--dtype", help="frozen models' weights: float32, bfloat16, float16 (the adapter stays float32)")
    run.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        help="autocast, by accelerate (default: no on CPU, the weights' on GPU)",
    )
    run.add_argument(
        "--no-cache-features",
        dest="cache_features",
        action="store_const",
        const=False,
        help="run the encoder every step",
    )
    run.add_argument(
        "--gradient-checkpointing", action="store_const", const=True, help="less memory for large LMs, ~30%% slower"
    )
    run.add_argument("--eval-beams", type=int, help="validation decoding beams (default: the task's)")
    run.add_argument("--eval-max-new-tokens", type=int, help="validation decoding length (default: the task's)")
    run.add_argument("--tiny", action="store_const", const=True, help="tiny random models (tests, smoke runs)")
    run.add_argument("--registry", help="another task registry file")
    run.add_argument("--push-to-hub", metavar="REPO", help="upload the adapter folder to this Hub repo at the end")
    run.add_argument("--no-progress", dest="progress", action="store_const", const=False)


def _tasks(registry: dict[str, TaskRefs]) -> int:
    """The tasks and whether their files are cached: the registry's refs and cache lookups, no torch."""
    from .hub import cached_parts

    rows = [("task", "modality", "kind", "language model", "encoder", "cached (adapter/LM/encoder)")]
    for task in registry.values():
        cached = cached_parts(task)
        marks = "/".join("yes" if cached[k] else "no" for k in ("adapter", "lm", "encoder"))
        rows.append((task.id, task.modality, task.kind, task.lm.id, task.encoder.id, marks))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _download(args: argparse.Namespace, registry: dict[str, TaskRefs]) -> int:
    """Each model once, however many of the tasks share it; one line per model: its commit, the files it
    took, what changed since the last download. A branch (`main`) is asked for its current commit."""
    from huggingface_hub import constants as hub_constants

    from .errors import UserError
    from .hub import locate, task_files
    from .media import describe_bytes

    failed = 0
    parts = [files for task_id in args.tasks for files in task_files(registry[task_id]).values() if files]
    for part in dict.fromkeys(parts):
        try:
            before = {name: path.resolve() for name, path in locate(part, local_only=True).items()}
        except UserError:
            before = {}
        try:
            found = locate(part, refresh=True)
        except UserError as exc:
            failed += 1
            _fail(exc)
            continue
        size = describe_bytes(sum(path.stat().st_size for path in found.values()))
        snapshot = next(iter(found.values())).parts
        commit = snapshot[snapshot.index("snapshots") + 1]
        changed = [name for name, path in found.items() if before and before.get(name) != path.resolve()]
        news = f"; changed since the last download: {', '.join(changed)}" if changed else ""
        print(f"{part.repo_id}@{commit}: {', '.join(found)} ({size}){news}", flush=True)
    if not failed:
        print(f"Cached in {hub_constants.HF_HUB_CACHE}: these tasks now run without network (HF_HUB_OFFLINE=1).")
        print("To pin a repo to what was fetched, write its commit as the `revision:` in the registry.")
    return 2 if failed else 0


def _check_tasks(parser: argparse.ArgumentParser, args: argparse.Namespace, registry: dict[str, TaskRefs]) -> None:
    """An unknown task, or a task of the other kind, is a usage error: said once, before any work.
    (With --adapter the task comes from the adapter's own config.)"""
    if args.command in ("caption", "ask") and getattr(args, "adapter", None):
        return
    for task_id in getattr(args, "tasks", None) or [args.task]:
        if task_id not in registry:
            parser.error(f"unknown task {task_id!r}; known tasks: {', '.join(registry)}")
    if args.command not in ("caption", "ask"):
        return
    task = registry[args.task]
    if args.command == "ask" and not task.needs_question:
        others = ", ".join(t.id for t in registry.values() if t.modality == task.modality and t.needs_question)
        parser.error(f"'{task.id}' writes captions and takes no question: use `caption`, or ask with one of: {others}")
    if args.command == "caption" and task.needs_question:
        parser.error(f"'{task.id}' answers questions: use `ask --question ...`")


def _check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What `caption` and `ask` are given, checked before anything is imported or read."""
    if not args.task and not args.adapter:
        parser.error("name a task (--task) or a trained adapter (--adapter)")
    if bool(args.paths) == bool(args.dataset):
        parser.error("give media files or folders, or --dataset NAME (one of the two)")
    if (args.ray or args.dataset) and not args.out:
        parser.error("--ray and --dataset write their answers to a file: add --out FILE.jsonl (or .parquet)")
    if args.out and args.save_inputs:
        parser.error("--save-inputs is for a few files at a time, not with --out")
    if (args.split or args.column) and not args.dataset:
        parser.error("--split and --column are for --dataset")
    if args.out and args.adapter:
        parser.error("--out answers with a registry task (--task); run a trained adapter on a few files at a time")


def _runner(args: argparse.Namespace, registry: dict[str, Task]) -> Runner:
    """Where `eval` and `caption`/`ask --out` predict: this process, or Ray workers (the same pipeline)."""
    from .evaluation import Runner

    pipeline = dict(device=args.device, dtype=args.dtype, tiny=args.tiny, registry=registry)
    if getattr(args, "max_batch_rows", None) is not None:
        pipeline["max_batch_rows"] = args.max_batch_rows
    return Runner(pipeline, args.ray, args.workers)


def _eval(args: argparse.Namespace) -> int:
    """`python -m epalm eval`: 0 when every item was predicted, 2 for a user error or failed items."""
    from .errors import UserError
    from .evaluation import evaluate
    from .tasks import load_registry

    decoding = {"preset": args.preset, "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    try:
        registry = load_registry(args.registry)
        result = evaluate(
            args.task,
            args.annotations,
            args.media,
            args.out,
            _runner(args, registry),
            questions=args.questions,
            image_pattern=args.image_pattern,
            split=args.split,
            limit=args.limit,
            decoding=decoding,
            progress=args.progress,
        )
    except UserError as exc:
        return _fail(exc)
    print(result.table)
    return 2 if result.failed else 0


def _bulk(args: argparse.Namespace, question: str | None) -> int:
    """`caption`/`ask` with --out: every input answered into a file, in one process or with Ray."""
    from .bulk import dataset_requests, media_files, run_bulk
    from .errors import UserError
    from .evaluation import Request
    from .tasks import load_registry

    decoding = {
        k: getattr(args, k)
        for k in ("preset", "num_beams", "do_sample", "temperature", "top_p", "top_k", "seed", "max_new_tokens")
    }
    try:
        registry = load_registry(args.registry)
        if args.dataset:
            requests = dataset_requests(args.dataset, args.split, args.column, question)
        else:
            requests = [Request(p, p, question) for p in media_files(args.paths, registry[args.task].modality)]
        answered, failed = run_bulk(args.task, requests, args.out, _runner(args, registry), decoding)
    except UserError as exc:
        return _fail(exc)
    print(f"{answered} answered, {failed} failed: {args.out}", file=sys.stderr)
    return 2 if failed else 0


def _run(args: argparse.Namespace, question: str | None) -> int:
    from .bulk import media_files
    from .errors import UserError
    from .media import MediaLimits, MiB
    from .pipeline import Pipeline
    from .tasks import load_registry

    limits = MediaLimits() if args.max_file_size is None else MediaLimits(max_file_bytes=int(args.max_file_size * MiB))
    decoding = {
        k: getattr(args, k)
        for k in ("num_beams", "do_sample", "temperature", "top_p", "top_k", "seed", "max_new_tokens", "max_length")
    }
    failed, folders, details = 0, set(), set()
    try:
        pipeline = Pipeline(
            device=args.device,
            dtype=args.dtype,
            tiny=args.tiny,
            registry=load_registry(args.registry) if args.registry else None,
            limits=limits,
        )
        if args.adapter:  # an adapter of the other kind: said once, saying what it is for
            pipeline.use_adapter(args.adapter, kind="caption" if question is None else "qa")
    except UserError as exc:
        return _fail(exc)
    inspect = args.save_inputs is not None
    if args.task:
        try:
            args.paths = media_files(args.paths, pipeline.task(args.task).modality)
        except UserError as exc:
            return _fail(exc)
    for path in args.paths:
        try:
            settings = dict(
                preset=args.preset, num_frames=args.num_frames, adapter=args.adapter, inspect=inspect, **decoding
            )
            if question is None:
                answer = pipeline.caption(path, args.task, **settings)
            else:
                answer = pipeline.answer(path, question, args.task, **settings)
            record = {"path": path, "answer": answer.text, "timings": vars(answer.timings), "notice": answer.notice}
            line = f"{path}\t{_printable(answer.text)}"
            if answer.notice:
                print(f"note: {path}: {answer.notice} (--max-new-tokens N sets it)", file=sys.stderr)
            if inspect:
                folder = _inputs_folder(args.save_inputs, path, folders)
                answer.inspection.save(folder, answer.text)
                record["inputs"] = str(folder)
        except UserError as exc:
            failed += 1
            record, line = {"path": path, "error": str(exc)}, f"{path}\tERROR: {exc}"
            if exc.detail and exc.detail not in details:  # for whoever runs this: once, not per file
                details.add(exc.detail)
                print(f"note: {exc.detail}", file=sys.stderr)
        except Exception as exc:  # an unforeseen failure on one file must not stop the batch
            log.info("unexpected failure on %s", path, exc_info=True)  # the traceback, with -v
            failed += 1
            record, line = (
                {"path": path, "error": f"{type(exc).__name__}: {exc}"},
                f"{path}\tERROR: {type(exc).__name__}: {exc}",
            )
        print(json.dumps(record) if args.jsonl else line, flush=True)
    return 2 if failed else 0


def _printable(text: str) -> str:
    """An answer as a terminal line may show it: control characters (a random model's bytes can be any,
    escape sequences included) written as escapes, never sent to the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _inputs_folder(root: Path, path: str, taken: set[Path]) -> Path:
    """DIR/<file name>, or DIR/<file name>-2, -3... when a batch has several files of that name."""
    name, number = Path(path).name, 1
    folder = root / name
    while folder in taken:
        number += 1
        folder = root / f"{name}-{number}"
    taken.add(folder)
    return folder


def _convert(args: argparse.Namespace) -> int:
    from .adapter_format import convert
    from .errors import UserError
    from .publish import push_to_hub
    from .tasks import get_task, load_registry

    try:
        out = convert(args.src, get_task(args.task, load_registry(args.registry)), args.out_dir)
        print(f"wrote {out}")
        if args.push_to_hub:
            print(f"uploaded to {push_to_hub(out, args.push_to_hub)}")
    except (KeyError, UserError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    return 0


def _train(args: argparse.Namespace) -> int:
    """`python -m epalm train`: 0 when trained (or nothing was left to resume), 2 for a user error,
    130 when interrupted."""
    from dataclasses import fields

    from .errors import UserError
    from .training import TrainConfig, TrainingInterrupted, train

    logging.getLogger("accelerate").setLevel(logging.WARNING)
    for name in ("epalm.training", "epalm.data"):  # the recipe, each validation, cut texts: said as they happen
        logging.getLogger(name).setLevel(logging.INFO)
    given = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig)}
    try:
        result = train(args.data, args.base, args.out, **{k: v for k, v in given.items() if v is not None})
    except TrainingInterrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    except UserError as exc:
        return _fail(exc)
    if result.already_finished:
        print(f"Nothing to resume: the run in {result.out} had finished. {result.summary}")
        print("Train again with --overwrite.")
        return 0
    if result.main_process:
        print(result.summary)
        if result.stopped:
            print(f"{result.stopped[0].upper()}{result.stopped[1:]}.")
        print(f"Adapter written to {result.out}")
    if result.url:
        print(f"uploaded to {result.url}")
    return 0


# The modules each command needs (default: the pipeline's), imported first by `_load`
_LIBRARIES = {  # what each command imports before it runs (the default: the pipeline, torch and all)
    "train": ("epalm.training", "accelerate", "datasets"),
    "parity": ("epalm.parity",),
    "tasks": ("epalm.hub",),  # cache lookups: no torch
    "download": ("epalm.hub",),
}


def main(argv: list[str] | None = None) -> int:
    """The `epalm` command. Ctrl-C before a command's own handling ends it quietly."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130


def _load(command: str) -> None:
    """Import the command's libraries (the first seconds of every command), Ctrl-C ending the process at
    once: raised inside torch's import, where C++ calls Python, an interrupt can abort the process
    ("terminate called after throwing an instance of 'pybind11::error_already_set'") instead of unwinding."""

    def stop(signum: int, frame: Any) -> None:
        print("\nInterrupted.", file=sys.stderr, flush=True)
        os._exit(130)  # nothing is written before the command runs: nothing to clean up

    try:
        previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread, which alone receives Ctrl-C
        previous = None
    try:
        for name in _LIBRARIES.get(command, ("epalm.pipeline",)):
            importlib.import_module(name)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command == "parity":
        _load(args.command)
        from . import parity

        return parity.main(args.cases)
    if args.command in ("caption", "ask"):
        _check_inputs(parser, args)  # usage errors before any import of the library
    from huggingface_hub.utils import logging as hub_logging

    from .errors import UserError
    from .refs import read_task_refs

    hub_logging.disable_propagation()  # huggingface_hub prints its warnings itself: once, not again through ours
    try:
        registry = read_task_refs(args.registry)  # where each task's files are, without torch
    except UserError as exc:
        return _fail(exc)
    if args.command not in ("train", "tasks"):
        _check_tasks(parser, args, registry)
    _load(args.command)
    if args.command == "train":
        return _train(args)
    if args.command == "tasks":
        return _tasks(registry)
    if args.command == "download":
        return _download(args, registry)
    if args.command == "convert":
        return _convert(args)
    if args.command == "eval":
        return _eval(args)
    if args.out:
        return _bulk(args, getattr(args, "question", None))
    return _run(args, getattr(args, "question", None))


def _fail(exc: UserError) -> int:
    """`error: message` on stderr, with the error's detail (for whoever runs this) under it; exit status 2."""
    print(f"error: {exc}", file=sys.stderr)
    if exc.detail:
        print(f"  {exc.detail}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

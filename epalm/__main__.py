"""Command line: `python -m epalm {tasks,caption,ask,convert,parity} ...`.

Several paths make one batch run that loads the models once and prints one line per path, in
input order: `PATH<TAB>answer` or `PATH<TAB>ERROR: message` (or JSON lines with --jsonl). A bad
file never stops the others; the exit status is 0 when every path succeeded and 2 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import parity
from .decoding import DEFAULT_PRESET, PRESETS
from .errors import UserError
from .hub import convert, push_to_hub
from .media import MediaLimits
from .pipeline import Pipeline
from .tasks import get_task, load_registry


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task id (see `python -m epalm tasks`)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models, no network (answers are meaningless)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16 (GPU default)")
    parser.add_argument("--registry", help="another task registry file (default: checkpoints/tasks.yaml)")
    presets = "; ".join(preset.label for preset in PRESETS.values())
    parser.add_argument(
        "--preset", choices=list(PRESETS), default=DEFAULT_PRESET, help=f"rules over the task's decoding ({presets})"
    )
    parser.add_argument("--beams", dest="num_beams", type=int, help="number of beams (1 = greedy)")
    parser.add_argument("--sample", dest="do_sample", action="store_const", const=True, help="sample instead of greedy")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", dest="top_p", type=float)
    parser.add_argument("--top-k", dest="top_k", type=int)
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="answer length (replaces max-length)")
    parser.add_argument("--max-length", dest="max_length", type=int, help="input + new ids (paper: 30)")
    parser.add_argument("--frames", dest="num_frames", type=int, help="video frames to sample (default: the task's)")
    parser.add_argument("--max-file-size", type=float, default=None, help="refuse media files larger than this many MB")
    parser.add_argument("--jsonl", action="store_true", help="one JSON object per path")
    parser.add_argument(
        "--save-inputs", type=Path, metavar="DIR",
        help="write what the model saw (PNGs) and its prompt, token probabilities and beams (JSON) to DIR/<file name>/",
    )
    parser.add_argument("paths", nargs="+", help="image, video or audio files")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m epalm", description="eP-ALM: caption or ask about images, video and audio.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    tasks = sub.add_parser("tasks", help="list the tasks and whether their files are cached")
    tasks.add_argument("--registry")
    _model_flags(sub.add_parser("caption", help="caption media files"))
    ask = sub.add_parser("ask", help="answer a question about media files")
    ask.add_argument("--question", "-q", required=True)
    _model_flags(ask)
    conv = sub.add_parser("convert", help="convert an original .pth adapter to adapter.safetensors + config")
    conv.add_argument("src", type=Path)
    conv.add_argument("out_dir", type=Path)
    conv.add_argument("--task", required=True)
    conv.add_argument("--registry")
    conv.add_argument("--push-to-hub", metavar="REPO", help="upload the converted folder to this Hub repo")
    par = sub.add_parser("parity", help="check against reference fixtures (same as python -m epalm.parity)")
    par.add_argument("cases", nargs="+")
    return parser


def _tasks(args: argparse.Namespace) -> int:
    from .hub import HubModels

    models = HubModels()
    rows = [("task", "modality", "kind", "language model", "encoder", "cached (adapter/LM/encoder)")]
    for task in load_registry(args.registry).values():
        cached = models.cached(task)
        marks = "/".join("yes" if cached[k] else "no" for k in ("adapter", "lm", "encoder"))
        rows.append((task.id, task.modality, task.kind, task.lm.id, task.encoder.id, marks))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _run(args: argparse.Namespace, question: str | None) -> int:
    limits = MediaLimits() if args.max_file_size is None else MediaLimits(max_file_bytes=int(args.max_file_size * 2**20))
    decoding = {k: getattr(args, k) for k in ("num_beams", "do_sample", "temperature", "top_p", "top_k", "seed", "max_new_tokens", "max_length")}
    failed, folders = 0, set()
    try:
        pipeline = Pipeline(device=args.device, dtype=args.dtype, tiny=args.tiny, registry=load_registry(args.registry) if args.registry else None, limits=limits)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    inspect = args.save_inputs is not None
    for path in args.paths:
        try:
            settings = dict(preset=args.preset, num_frames=args.num_frames, inspect=inspect, **decoding)
            if question is None:
                answer = pipeline.caption(path, args.task, **settings)
            else:
                answer = pipeline.answer(path, question, args.task, **settings)
            record = {"path": path, "answer": answer.text, "timings": vars(answer.timings), "notice": answer.notice}
            line = f"{path}\t{answer.text}"
            if answer.notice:
                print(f"note: {path}: {answer.notice} (--max-new-tokens N sets it)", file=sys.stderr)
            if inspect:
                folder = _inputs_folder(args.save_inputs, path, folders)
                answer.inspection.save(folder, answer.text)
                record["inputs"] = str(folder)
        except UserError as exc:
            failed += 1
            record, line = {"path": path, "error": str(exc)}, f"{path}\tERROR: {exc}"
        except Exception as exc:  # an unforeseen failure on one file must not stop the batch
            logging.getLogger(__name__).debug("unexpected failure on %s", path, exc_info=True)
            failed += 1
            record, line = {"path": path, "error": f"{type(exc).__name__}: {exc}"}, f"{path}\tERROR: {type(exc).__name__}: {exc}"
        print(json.dumps(record) if args.jsonl else line, flush=True)
    return 2 if failed else 0


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
    try:
        out = convert(args.src, get_task(args.task, load_registry(args.registry)), args.out_dir)
        print(f"wrote {out}")
        if args.push_to_hub:
            print(f"uploaded to {push_to_hub(out, args.push_to_hub)}")
    except (KeyError, UserError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command == "tasks":
        return _tasks(args)
    if args.command == "convert":
        return _convert(args)
    if args.command == "parity":
        return parity.main(args.cases)
    return _run(args, getattr(args, "question", None))


if __name__ == "__main__":
    sys.exit(main())

"""The eP-ALM demo: Image, Video and Audio tabs over `epalm.Pipeline` (Gradio 6 Blocks).

    python app.py                 # serves at once; the first tab's task loads in the background, others on first use
    python app.py --tiny          # tiny random models, no download (answers are meaningless)
    python app.py --allow-local-adapters   # the Adapter field also takes folders on this machine

Every flag has an environment variable (for Hugging Face Spaces): see `python app.py --help`.
The tabs, menus and API endpoints are built from the task registry: a task added to
`checkpoints/tasks.yaml` (or the file named by EPALM_TASKS) appears here without code changes.
"""

from __future__ import annotations

import argparse
import os

from epalm.media import MediaError, MediaLimits, check_in_folders  # light: no torch, so that --help answers at once


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    limits = MediaLimits()
    parser = argparse.ArgumentParser(
        description="eP-ALM demo (Gradio)", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--device", default=env("EPALM_DEVICE", "auto"), help="cpu, cuda, cuda:N or auto [EPALM_DEVICE]"
    )
    parser.add_argument(
        "--dtype",
        default=env("EPALM_DTYPE", "auto"),
        help="float32, bfloat16, float16 or auto (float16 on GPU, float32 on CPU) [EPALM_DTYPE]",
    )
    parser.add_argument(
        "--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to serve on [GRADIO_SERVER_NAME]"
    )
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")), help="[GRADIO_SERVER_PORT]")
    parser.add_argument(
        "--share", action="store_true", default=env_flag("EPALM_SHARE"), help="public gradio.live link [EPALM_SHARE]"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        default=env_flag("EPALM_TINY"),
        help="tiny random models, no network [EPALM_TINY]",
    )
    parser.add_argument(
        "--allow-local-adapters",
        action="store_true",
        default=env_flag("EPALM_ALLOW_LOCAL_ADAPTERS"),
        help="the Adapter field also takes adapter folders on this machine, not only Hub repo ids; "
        "for an app only you can reach [EPALM_ALLOW_LOCAL_ADAPTERS]",
    )
    parser.add_argument(
        "--preload",
        nargs="*",
        default=None if env("EPALM_PRELOAD") is None else env("EPALM_PRELOAD", "").split(),
        metavar="TASK",
        help="load these tasks at start-up, in the background, so that the first answer does not wait for them; "
        "default: the first tab's first task (most tasks share its LM); none: `--preload` alone or "
        "EPALM_PRELOAD='' [EPALM_PRELOAD]",
    )
    parser.add_argument(
        "--max-file-size",
        type=float,
        default=float(env("EPALM_MAX_FILE_SIZE", limits.max_file_bytes / 2**20)),
        help="upload limit in MB [EPALM_MAX_FILE_SIZE]",
    )
    parser.add_argument(
        "--max-duration",
        type=float,
        default=float(env("EPALM_MAX_DURATION", limits.max_clip_seconds)),
        help="longest video or audio clip, in seconds [EPALM_MAX_DURATION]",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=int(env("EPALM_CONCURRENCY", "0")),
        help="requests served at once; 0: the rows limit when batching, else 1 on CPU, 2 on GPU [EPALM_CONCURRENCY]",
    )
    parser.add_argument(
        "--max-batch-rows",
        type=int,
        help="rows decoded together in one step (a 3-beam answer takes 3); unset: EPALM_MAX_BATCH_ROWS, else "
        "the library's default (epalm.serving.MAX_BATCH_ROWS)",
    )
    parser.add_argument(
        "--no-batching",
        action="store_true",
        help="decode each request alone instead of sharing steps with the others; unset: EPALM_BATCHING (on)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=int(env("EPALM_QUEUE_SIZE", "32")),
        help="waiting requests before 'busy' [EPALM_QUEUE_SIZE]",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()  # --help and bad flags are answered here, before torch and gradio are imported

import inspect  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import queue  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from epalm import (  # noqa: E402
    DEFAULT_PRESET,
    MAX_QUESTION_CHARS,
    PRESETS,
    InputError,
    Inspection,
    Pipeline,
    Task,
    UserError,
)
from epalm.tasks import KIND_WORDS  # noqa: E402

try:  # ZeroGPU on Hugging Face Spaces: model calls get a GPU only inside @spaces.GPU
    import spaces

    gpu = spaces.GPU(duration=120)
    ZERO_GPU = True
except ImportError:
    gpu = lambda fn: fn  # noqa: E731
    ZERO_GPU = False

log = logging.getLogger("epalm.app")
EXAMPLES = Path(__file__).resolve().parent / "examples"
MODALITIES = ("image", "video", "audio")
MEDIA_NAMES = {"image": "an image", "video": "a video", "audio": "an audio clip"}
SEEN_LABELS = {
    "image": "The encoder's input: the picture resized to 224×224",
    "video": "The frames sampled for the encoder, with their times",
    "audio": "The log-mel spectrogram the encoder heard (time →, pitch ↑)",
}
TOKENS_LABEL = "Answer tokens, shaded by the model's probability"
NOTHING_SEEN = ([], [], "")  # the panel cleared: gallery, tokens, description
QUESTIONS = {"image": "What is in the picture?", "video": "What is happening?", "audio": "What is making this sound?"}
DELETE_CACHE = (600, 3600)  # every 10 minutes, delete uploads older than an hour


@dataclass(frozen=True)
class Kind:
    """How a kind of task (registry `kind`) appears: its sub-tab, button, output box and endpoint."""

    tab: str
    button: str
    output: str
    endpoint: str


KINDS = {
    "caption": Kind("Caption", "Caption", "Caption", "caption"),
    "qa": Kind("Ask a question", "Answer", "Answer", "answer"),
}


@dataclass
class Demo:
    """The handlers behind the UI and the API; each turns library errors into messages for people."""

    pipeline: Pipeline
    preloading: dict[str, str] = field(default_factory=dict)  # task id -> "loading…", "ready" or the failure

    def status(self) -> str:
        pipe = self.pipeline
        loaded = ", ".join(pipe.loaded(users_adapters=False)) or "nothing yet (models load on first use)"
        parts = [f"Device **{pipe.device.type}** · **{pipe.dtype_name}**"]
        parts.append(f"**tiny random stand-ins** loaded for: {loaded}" if pipe.random_weights else f"loaded: {loaded}")
        for task_id, state in self.preloading.items():
            if state != "ready":
                parts.append(f"preload of `{task_id}`: {state}")
        return " · ".join(parts)

    def start_preload(self, task_ids: list[str]) -> threading.Thread:
        """Load these tasks in the background, one after the other; the status line shows each outcome."""
        self.preloading.update({task_id: "waiting" for task_id in task_ids})
        thread = threading.Thread(target=self._preload, args=(task_ids,), daemon=True)
        thread.start()
        return thread

    def _preload(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            self.preloading[task_id] = "loading…"
            try:
                self.pipeline.preload([task_id])
                self.preloading[task_id] = "ready"
            except UserError as exc:
                log.warning("preload of %s failed: %s", task_id, exc)
                self.preloading[task_id] = f"failed: {exc}"
            except Exception as exc:
                log.exception("preload of %s failed", task_id)
                self.preloading[task_id] = f"failed: {type(exc).__name__}: {exc}"

    def preloading_now(self) -> bool:
        return any(state in ("waiting", "loading…") for state in self.preloading.values())

    def run(self, modality: str, request: dict[str, Any]) -> Iterator[tuple]:
        """Stream (answer, info, *what the model saw) for one request: load stages and downloads in the
        info box first, then the answer. A refused or failed request leaves its message in the info box
        and raises a `gr.Error` (for the toast and for API clients)."""
        try:
            yield from self._answers(modality, request)
        except UserError as exc:
            log.info("refused a %s request: %s", modality, exc)
            message = str(exc)
        except Exception as exc:
            log.exception("%s request failed", modality)
            message = f"Something went wrong: {type(exc).__name__}: {exc}"
        else:
            return
        yield "", f"⚠️ {message}", *NOTHING_SEEN
        raise gr.Error(message, print_exception=False)

    def _answers(self, modality: str, request: dict[str, Any]) -> Iterator[tuple]:
        media = request["media"]
        if media is None or media == "":
            raise InputError(f"Please upload {MEDIA_NAMES[modality]} first.")
        adapter = (request.get("adapter") or "").strip() or None
        if adapter and not self.pipeline.is_adapter_served(adapter):
            yield "", "⏳ Loading the adapter…", *NOTHING_SEEN  # its config first, its weights once accepted
        # temperature and top-p shape sampling only; decoding ignores them for beams and greedy
        decoding: dict[str, Any] = {"temperature": float(request["temperature"]), "top_p": float(request["top_p"])}
        if request["max_new_tokens"]:
            decoding.update(max_new_tokens=int(request["max_new_tokens"]))
        if request.get("frames"):
            decoding["num_frames"] = int(request["frames"])
        stages: queue.SimpleQueue = queue.SimpleQueue()
        answers = self.pipeline.stream(
            media,
            request["task"],
            request.get("question"),
            preset=request["preset"],
            progress=stages.put,
            inspect=True,
            adapter=adapter,
            modality=modality,
            **decoding,
        )
        first = _first_in_background(answers, stages)
        while True:  # checks, loading and downloads until the first answer
            stage = stages.get()
            while stage is not first and not stages.empty():  # show only the latest of a burst of reports
                stage = stages.get()
            if stage is first:
                break
            yield "", f"⏳ {stage}", *NOTHING_SEEN
        if first.error is not None:
            raise first.error
        shown = False
        for answer in itertools.chain([first.answer], answers) if first.answer is not None else ():
            if answer.done:
                info = f"`{answer.task}` · {answer.timings.summary()} · {answer.device}/{answer.dtype}"
                info += f"  \n{answer.notice} (Advanced › Max new tokens)" if answer.notice else ""
                yield answer.text, info, *seen_outputs(answer.inspection)
            else:  # the media and the prompt once, while the tokens stream
                yield answer.text, "generating…", *((gr.skip(),) * 3 if shown else seen_outputs(answer.inspection))
                shown = True


def seen_outputs(inspection: Inspection) -> tuple[list, list, str]:
    """The panel's values: the encoder's input as (picture, caption) pairs, the answer's tokens
    with their probabilities (shaded by HighlightedText), and the rest in words."""
    pictures = list(zip(inspection.seen.images, inspection.seen.captions))
    tokens = [(token.text, round(token.prob, 4)) for token in inspection.tokens]
    return pictures, tokens, inspection.describe()


@dataclass
class _First:
    answer: Any = None
    error: BaseException | None = None


def _first_in_background(answers: Iterator[Any], stages: queue.SimpleQueue) -> _First:
    """Pull the first answer in another thread (it is where the checks, loads and downloads happen) and
    put the result on `stages` after the stage messages, so that they can be shown as they come."""
    first = _First()

    def pull() -> None:
        try:
            first.answer = next(answers, None)
        except BaseException as exc:  # re-raised by the request's own thread
            first.error = exc
        stages.put(first)

    threading.Thread(target=pull, daemon=True).start()
    return first


def _uploads_only(component: gr.components.Component, limits: Callable[[], MediaLimits]) -> gr.components.Component:
    """Make a media input accept only files uploaded to this app (or its examples): every payload's path is
    checked against the pipeline's `limits().folders` before anything opens it, on every event that takes
    the input, named or not. Gradio checks only payloads marked as its files (`meta._type`); one without
    the mark would reach the component's preprocessing with any server path. An image then goes to the
    handler as the uploaded file itself: Gradio's `Image` would decode and convert it with Pillow first (all
    of it, however large, dropping alpha and clipping 16-bit values), where `epalm` reads the header first
    and converts as the CLI does. Video and audio keep Gradio's own preprocessing after the check. (An
    instance attribute, not a subclass: Gradio writes a .pyi stub next to the module of every subclass.)"""
    gradio_preprocess = component.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is None:
            return None
        path = payload.path
        if path is None:  # a data: URL (a pasted image): Gradio writes its bytes into the upload folder
            return gradio_preprocess(payload)
        try:
            checked = check_in_folders(path, limits().folders)  # the rest (size, format) is the handler's to say
        except MediaError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return str(checked) if isinstance(component, gr.Image) else gradio_preprocess(payload)

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def _media_input(modality: str, limits: Callable[[], MediaLimits]) -> gr.components.Component:
    if modality == "image":
        media = gr.Image(
            label="Image", sources=["upload", "webcam", "clipboard"], type="filepath", elem_id="image-input"
        )
    elif modality == "video":
        media = gr.Video(label="Video", sources=["upload", "webcam"], elem_id="video-input")
    else:
        media = gr.Audio(label="Audio", sources=["upload", "microphone"], type="filepath", elem_id="audio-input")
    return _uploads_only(media, limits)


def _parameters(modality: str, kind: str, tasks: list[Task]) -> list[inspect.Parameter]:
    """The endpoint's parameters, in API order: media (and question) first, then settings with defaults."""
    p = lambda name, default=inspect.Parameter.empty: inspect.Parameter(  # noqa: E731
        name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default
    )
    params = [p("media")] + ([p("question")] if kind == "qa" else [])
    params += [
        p("task", tasks[0].id),
        p("preset", DEFAULT_PRESET),
        p("max_new_tokens", 0),
        p("temperature", 0.7),
        p("top_p", 0.9),
    ]
    return params + ([p("frames", 0)] if modality == "video" else []) + [p("adapter", "")]


def _endpoint(demo: Demo, modality: str, kind: str, tasks: list[Task]) -> Callable[..., Iterator[tuple]]:
    """A named endpoint whose API parameters are exactly the inputs this modality and kind use."""
    params = _parameters(modality, kind, tasks)
    names = [param.name for param in params]

    def endpoint(*values: Any) -> Iterator[tuple]:
        yield from demo.run(modality, dict(zip(names, values)))

    endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    endpoint.__name__ = f"{KINDS[kind].endpoint}_{modality}"
    return gpu(endpoint)


def _examples(modality: str, kind: str) -> list[list[str]]:
    """Files under examples/<modality>/ (see examples/README.md), each with a question in question mode."""
    folder = EXAMPLES / modality
    files = (
        sorted(p for p in folder.glob("*") if p.suffix.lower() not in (".md", ".txt", ".py")) if folder.is_dir() else []
    )
    return [[str(f), QUESTIONS[modality]] if kind == "qa" else [str(f)] for f in files]


def _kind_tab(
    demo: Demo, modality: str, kind: str, tasks: list[Task], media: Any, settings: list, concurrency: int
) -> tuple[Any, list]:
    """One sub-tab (Caption, or Ask a question): model menu, question, Run and Stop, output, examples.
    Returns the model event and its output boxes."""
    ui = KINDS[kind]
    prefix = f"{modality}-{kind}"
    task = gr.Dropdown(
        [(t.menu_label, t.id) for t in tasks], value=tasks[0].id, label="Model", elem_id=f"{prefix}-task"
    )
    where = "a Hub repo id or a folder on this machine" if demo.pipeline.allow_local_adapters else "a Hub repo id"
    adapter = gr.Textbox(
        "",
        label="Adapter (optional)",
        placeholder=f"your trained adapter: {where}, e.g. me/my-adapter",
        info=f"Used instead of the Model menu; it must be trained for {modality} {KIND_WORDS[kind]}.",
        max_lines=1,
        elem_id=f"{prefix}-adapter",
    )
    question = None
    if kind == "qa":
        question = gr.Textbox(
            label="Question",
            placeholder="e.g. What is the dog doing?",
            max_length=MAX_QUESTION_CHARS,
            elem_id=f"{prefix}-question",
        )
    with gr.Row():
        run = gr.Button(ui.button, variant="primary", elem_id=f"{prefix}-run")
        stop = gr.Button("Stop", variant="secondary", scale=0, min_width=100, elem_id=f"{prefix}-stop")
    answer = gr.Textbox(label=ui.output, lines=3, buttons=["copy"], elem_id=f"{prefix}-answer")
    info = gr.Markdown(label="Details", elem_id=f"{prefix}-info")
    with gr.Accordion("What the model saw", open=True, elem_id=f"{prefix}-seen"):
        seen = gr.Gallery(
            label=SEEN_LABELS[modality],
            columns=4 if modality == "video" else 1,
            height="auto",
            object_fit="contain",
            format="png",
            interactive=False,
            elem_id=f"{prefix}-seen-media",
        )
        tokens = gr.HighlightedText(label=TOKENS_LABEL, elem_id=f"{prefix}-tokens")
        described = gr.Markdown(label="What the model saw", elem_id=f"{prefix}-seen-text")
    outputs = [answer, info, seen, tokens, described]
    inputs = [media] + ([question] if question is not None else []) + [task, *settings, adapter]
    # the button is the one way in (Enter in the question box and example clicks press it): it clears the
    # old answer at once in the browser, then runs the endpoint
    cleared = run.click(None, None, outputs, js=f"() => {json.dumps(['', '', *NOTHING_SEEN])}")
    event = cleared.then(
        _endpoint(demo, modality, kind, tasks),
        inputs,
        outputs,
        api_name=f"{ui.endpoint}_{modality}",
        concurrency_id="model",
        concurrency_limit=concurrency,
        show_progress="full",
        show_progress_on=[answer],
    )
    if question is not None:
        question.submit(None, js=_press(prefix))
    stop.click(None, None, None, cancels=[event])
    rows = _examples(modality, kind)
    if rows and modality == "audio":  # the examples table shows file names only: give each a player
        with gr.Row(elem_id=f"{prefix}-players"):
            for row in rows:
                gr.Audio(row[0], label=Path(row[0]).name, interactive=False)
    if rows:
        _examples_table(prefix, [media] + ([question] if question is not None else []), rows)
    return event, outputs


def _examples_table(prefix: str, inputs: list, rows: list[list[str]]) -> None:
    """Clicking an example fills the inputs, then presses the visible button: it runs the same
    endpoint, task and settings as the user would. (Not gr.Examples: it fills inputs with
    gr.update, which rebuilds the image input as a plain gr.Image in the session, without
    `_uploads_only`.)"""
    table = gr.Dataset(
        components=inputs,
        samples=rows,
        type="values",
        headers=[c.label for c in inputs],
        label="Examples (click one to run it)",
        elem_id=f"{prefix}-examples",
    )

    def load_example(row: list[str]) -> Any:
        return row if len(row) > 1 else row[0]

    filled = table.click(load_example, table, inputs, queue=False, show_progress="hidden", api_visibility="private")
    filled.then(None, js=_press(prefix))


def _press(prefix: str) -> str:
    """Browser code that presses the sub-tab's button, so every way in runs the same event."""
    return f"() => {{ document.getElementById('{prefix}-run').click(); }}"


def _tab(demo: Demo, modality: str, tasks: dict[str, list[Task]], concurrency: int) -> list:
    """One modality: the media input and shared settings, then a sub-tab per kind of task.
    Returns (model event, output boxes) per sub-tab."""
    with gr.Row():
        with gr.Column():
            media = _media_input(modality, lambda: demo.pipeline.limits)
            with gr.Accordion("Advanced", open=False):
                preset = gr.Radio(
                    [(preset.label, name) for name, preset in PRESETS.items()], value=DEFAULT_PRESET, label="Decoding"
                )
                temperature = gr.Slider(0.1, 2.0, value=0.7, step=0.05, label="Temperature (sampling)")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p (sampling)")
                max_new_tokens = gr.Slider(0, 64, value=0, step=1, label="Max new tokens (0 = the task's own limit)")
                settings = [preset, max_new_tokens, temperature, top_p]
                if modality == "video":
                    settings.append(gr.Slider(0, 32, value=0, step=1, label="Frames to sample (0 = the task's)"))
        with gr.Column():
            events = []
            with gr.Tabs():
                for kind, kind_tasks in tasks.items():
                    with gr.Tab(KINDS[kind].tab, elem_id=f"{modality}-{kind}-tab"):
                        events.append(_kind_tab(demo, modality, kind, kind_tasks, media, settings, concurrency))
    outputs = [component for _, components in events for component in components]
    # a new upload clears the answers about the previous one (in the browser: no request is made)
    cleared = json.dumps(["", "", *NOTHING_SEEN] * len(events))
    media.change(None, None, outputs, js=f"() => {cleared}")
    return events


def tasks_by_modality(pipeline: Pipeline) -> dict[str, dict[str, list[Task]]]:
    """modality -> kind -> tasks, in registry order (what the tabs and menus show)."""
    grouped: dict[str, dict[str, list[Task]]] = {}
    for task in pipeline.tasks.values():
        grouped.setdefault(task.modality, {}).setdefault(task.kind, []).append(task)
    return {m: {k: grouped[m][k] for k in KINDS if k in grouped[m]} for m in MODALITIES if m in grouped}


def default_preload(pipeline: Pipeline) -> list[str]:
    """What loads at start-up unless told otherwise: the task the page opens on (the first tab's first
    menu entry), so that the first answer finds its models loaded or loading."""
    first_tab = next(iter(tasks_by_modality(pipeline).values()), {})
    first_kind = next(iter(first_tab.values()), [])
    return [first_kind[0].id] if first_kind else []


def default_concurrency(pipeline: Pipeline) -> int:
    """Requests served at once: with batching, as many as one step may hold (the library's scheduler
    shares each decode step among them); without, 1 on CPU and 2 on GPU (one call at a time each)."""
    if pipeline.batching:
        return pipeline.max_batch_rows
    return 2 if pipeline.device.type == "cuda" else 1


def build(
    pipeline: Pipeline,
    concurrency: int | None = None,
    demo: Demo | None = None,
    delete_cache: tuple[int, int] = DELETE_CACHE,
) -> gr.Blocks:
    """The whole UI. `concurrency` = requests served at once (default: see `default_concurrency`)."""
    demo = demo or Demo(pipeline)
    concurrency = concurrency or default_concurrency(pipeline)
    # the app reads only what its users uploaded and its own examples, never another path on this machine
    pipeline.limits = replace(pipeline.limits, folders=(get_upload_folder(), str(EXAMPLES)))
    pipeline.any_adapter_models = False  # users' adapters run on the models this app serves, not on what they name
    with gr.Blocks(title="eP-ALM demo", delete_cache=delete_cache) as blocks:
        gr.Markdown(
            "# eP-ALM: Efficient Perceptual Augmentation of Language Models\n"
            "A frozen OPT language model reads frozen image, video and audio encoders through a few million "
            "trained parameters ([paper](https://arxiv.org/abs/2303.11403), ICCV 2023). Upload a file, ask for a "
            "caption or a question."
        )
        if pipeline.random_weights:
            gr.Markdown(
                "⚠️ **Smoke mode (`--tiny`)**: tiny random models, nothing downloaded: answers are meaningless.",
                elem_id="tiny-banner",
            )
        status = gr.Markdown(demo.status(), elem_id="status")
        events = []
        for modality, tasks in tasks_by_modality(pipeline).items():
            with gr.Tab(modality.capitalize(), id=modality, elem_id=f"{modality}-tab"):
                events += _tab(demo, modality, tasks, concurrency)
        for event, _ in events:
            event.then(demo.status, None, status, api_visibility="private", queue=False)
        timer = gr.Timer(2.0, active=demo.preloading_now())
        timer.tick(
            lambda: (demo.status(), gr.Timer(active=demo.preloading_now())),
            None,
            [status, timer],
            api_visibility="private",
            queue=False,
        )
        blocks.load(demo.status, None, status, api_visibility="private", queue=False)
    return blocks


def start(args: argparse.Namespace) -> Demo:
    """The pipeline the flags ask for, with its start-up tasks loading in the background (exits on a
    bad flag)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    limits = MediaLimits(max_file_bytes=int(args.max_file_size * 2**20), max_clip_seconds=args.max_duration)
    try:
        pipeline = Pipeline(
            device=args.device,
            dtype=args.dtype,
            tiny=args.tiny,
            limits=limits,
            # None: the library reads EPALM_BATCHING / EPALM_MAX_BATCH_ROWS (one parser, one default); ZeroGPU
            # runs each call in its own GPU process, where nothing could share a step
            batching=False if args.no_batching or ZERO_GPU else None,
            max_batch_rows=args.max_batch_rows,
            allow_local_adapters=args.allow_local_adapters,
        )
        preload = args.preload if args.preload is not None else default_preload(pipeline)
        unknown = [task_id for task_id in preload if task_id not in pipeline.tasks]
        if unknown:
            raise UserError(
                f"unknown task(s) to preload: {', '.join(unknown)}; known tasks: {', '.join(pipeline.tasks)}"
            )
    except UserError as exc:
        sys.exit(f"error: {exc}")
    demo = Demo(pipeline)
    demo.start_preload(preload)  # in the background: the page is served at once
    return demo


if __name__ == "__main__":  # the models start loading now, so that gradio's import (~3 s) overlaps the read
    STARTED = start(ARGS)

import gradio as gr  # noqa: E402  (after `start`, see above; every use of it below is inside a function)
from gradio.utils import get_upload_folder  # noqa: E402


def main(args: argparse.Namespace, block: bool = True, demo: Demo | None = None) -> gr.Blocks:
    """Serve the app (`demo`: what `start(args)` returned, if it already ran); with `block=False`,
    return the running app (tests stop it with `.close()`)."""
    demo = demo or start(args)
    pipeline = demo.pipeline
    concurrency = args.concurrency or default_concurrency(pipeline)
    blocks = build(pipeline, concurrency, demo)
    blocks.queue(max_size=args.queue_size, default_concurrency_limit=concurrency).launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=pipeline.limits.max_file_bytes,  # the limit the pipeline checks too
        allowed_paths=[str(EXAMPLES)],
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return blocks


if __name__ == "__main__":
    main(ARGS, demo=STARTED)

"""The eP-ALM demo: Image, Video and Audio tabs over `epalm.Pipeline` (Gradio 6 Blocks). The UI only:
every check, model, policy and setting is the library's (`epalm.config` reads the flags).

    python app.py                 # serves at once; the first tab's task loads in the background, others on first use
    python app.py --tiny          # tiny random models, no download (answers are meaningless)
    python app.py --allow-local-adapters   # the Adapter field also takes folders on this machine

Every flag has an environment variable (for Spaces): `python app.py --help`. The tabs, menus and API
endpoints are built from the task registry (`checkpoints/tasks.yaml`, or EPALM_TASKS): no code changes.
"""

from __future__ import annotations

import base64
import inspect
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from epalm.config import ServingConfig
from epalm.errors import UserError
from epalm.media import MediaError, MediaLimits, check_in_folders

if __name__ == "__main__":
    try:  # --help and bad flags are answered here, before torch and gradio are imported
        CONFIG = ServingConfig.parse()
    except UserError as exc:
        sys.exit(f"error: {exc}")

from epalm import DEFAULT_PRESET, MAX_QUESTION_CHARS, PRESETS, Answer, Inspection, Pipeline, Status
from epalm.inspection import response_folder
from epalm.tasks import KIND_WORDS, Task, tasks_by_modality
from epalm.video import MAX_FRAMES

log = logging.getLogger("epalm.app")
EXAMPLES = Path(__file__).resolve().parent / "examples"
SEEN_LABELS = {
    "image": "The encoder's input: the picture resized to 224×224",
    "video": "The frames sampled for the encoder, with their times",
    "audio": "The log-mel spectrogram the encoder heard (time →, pitch ↑)",
}
NOTHING_SEEN = ([], [], "")  # the panel cleared: gallery, tokens, description
QUESTIONS = {"image": "What is in the picture?", "video": "What is happening?", "audio": "What is making this sound?"}
DELETE_CACHE = (600, 3600)  # every 10 minutes, delete uploads older than an hour
SAMPLING = PRESETS["sampling"].overrides  # the sliders start at the sampling preset's own values
SEEN_CSS = (  # the image and the spectrogram in a box of their shape, not a square cell; the beams' numbers unwrapped
    ":is([id^=image-], [id^=audio-])[id$=-seen-media] .thumbnail-item {aspect-ratio: auto; max-height: 320px}"
    "[id$=-seen-text] :is(th, td:not(:nth-child(2))) {white-space: nowrap}"
)
KINDS = {"caption": ("Caption", "Caption", "caption"), "qa": ("Ask a question", "Answer", "answer")}  # tab, button, api


def start(config: ServingConfig) -> Pipeline:
    """The pipeline the flags ask for, its start-up tasks loading in the background (exits on a bad flag)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        pipeline = Pipeline.from_config(config)  # (`build` keeps users' adapters on the app's models)
        pipeline.start_preload(None if config.preload is None else list(config.preload))
    except UserError as exc:
        sys.exit(f"error: {exc}")
    return pipeline


if __name__ == "__main__":  # the models start loading now, so that gradio's import (~3 s) overlaps the read
    STARTED = start(CONFIG)

import gradio as gr  # noqa: E402  (after `start`, see above; every use of it below is inside a function)
from gradio.processing_utils import extract_base64_data  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402


def status(pipeline: Pipeline) -> str:
    loaded = ", ".join(pipeline.loaded(users_adapters=False)) or "nothing yet (models load on first use)"
    parts = [f"Device **{pipeline.device.type}** · **{pipeline.dtype_name}**"]
    parts.append(f"**tiny random stand-ins** loaded for: {loaded}" if pipeline.random_weights else f"loaded: {loaded}")
    preloading = [(task, state.split(":")[0]) for task, state in pipeline.preloading.items()]
    return " · ".join(parts + [f"preload of `{task}`: {state}" for task, state in preloading if state != "ready"])


def respond(pipeline: Pipeline, modality: str, values: dict[str, Any]) -> Iterator[tuple]:
    """Stream (answer, info, *what the model saw) for one request: what it is doing in the info box, then
    the answer. A refused or failed request leaves its message in the info box and raises a `gr.Error`."""
    try:
        shown, pictures = False, None
        events = pipeline.stream(
            values["media"],
            values["task"],
            values.get("question"),
            preset=values["preset"],
            inspect=True,
            adapter=values["adapter"],
            modality=modality,
            num_frames=values.get("frames") or None,
            max_new_tokens=values["max_new_tokens"] or None,
            temperature=values["temperature"],
            top_p=values["top_p"],
        )
        for event in events:
            if isinstance(event, Status):
                yield gr.skip(), f"⏳ {event}", *((gr.skip(),) * 3 if shown else NOTHING_SEEN)
            else:  # the media and the prompt once while the tokens stream, then with the final answer
                pictures = pictures or seen_pictures(event.inspection)
                seen = seen_outputs(event.inspection, pictures) if event.done or not shown else (gr.skip(),) * 3
                yield event.text, info_line(event) if event.done else "generating…", *seen
            shown = shown or isinstance(event, Answer)
    except UserError as exc:
        log.info("refused a request (%s): %s", modality, f"{exc} ({exc.detail})" if exc.detail else exc)
        message = str(exc)
    except Exception as exc:
        log.exception("%s request failed", modality)
        message = f"Something went wrong ({type(exc).__name__}); the server's log has the details."
    else:
        return
    yield "", f"⚠️ {message}", *NOTHING_SEEN
    raise gr.Error(message.replace("`", ""), print_exception=False)


def info_line(answer: Answer) -> str:
    info = f"`{answer.task}` · {answer.timings.summary()} · {answer.device}/{answer.dtype}"
    return info + (f"  \n{answer.notice} (Advanced › Max new tokens)" if answer.notice else "")


def seen_pictures(inspection: Inspection) -> list[tuple[str, str]]:
    """The encoder's input as (picture file, caption) pairs, written once per response into a folder of its own
    (Gradio writes an array's PNG in place, at one path for identical pictures), kept as long as uploads are."""
    files = inspection.save_pictures(response_folder(Path(get_upload_folder()) / "epalm-seen", DELETE_CACHE[1]))
    return [(str(path), caption) for path, caption in zip(files, inspection.seen.captions)]


def seen_outputs(inspection: Inspection, pictures: list[tuple[str, str]]) -> tuple[list, list, str]:
    """The panel's values: the pictures (`seen_pictures`), the tokens, the rest in words."""
    tokens = [(token.text, round(token.prob, 4)) for token in inspection.tokens]
    return pictures, tokens, inspection.describe(tokens=False)


def _checked(component: Any, name: str, limits: Callable[[], MediaLimits] | None = None) -> Any:
    """`component` as an input whose refusals name its API parameter, `name`, on every event (raw JSON can
    send a word for a slider). With `limits`, a media input that takes only files uploaded here (or the
    examples), checked before anything opens them: Gradio checks only payloads marked as its files
    (`meta._type`). An image goes to the handler as the file itself: Gradio's `Image` would decode it whole
    with Pillow first, where `epalm` reads the header first. (An instance attribute, not a subclass: Gradio
    writes a .pyi stub next to the module of every subclass.)"""
    gradio_preprocess = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            image = isinstance(component, gr.Image) and payload is not None
            if image and not payload.path and (payload.url or "").startswith("data:"):  # a pasted image: its
                # bytes as the file itself, for epalm's checks (size, pixels from the header), not Gradio's decode
                return base64.b64decode(extract_base64_data(payload.url), validate=True)
            if limits is None or payload is None or payload.path is None:  # no file, or a clip in a data: URL
                return gradio_preprocess(payload)
            checked = check_in_folders(payload.path, limits().folders)  # the rest (size, format) is the handler's
            return str(checked) if isinstance(component, gr.Image) else gradio_preprocess(payload)
        except MediaError as exc:  # the same words for any path not uploaded here
            raise gr.Error(str(exc), print_exception=False) from None
        except gr.Error as exc:
            raise gr.Error(f"{name}: {exc.message}", print_exception=False) from None
        except Exception:  # Gradio's own conversions, on a value of another type
            raise gr.Error(f"{name}: {str(payload)[:40]!r} is not a value it takes", print_exception=False) from None

    component.preprocess, component.checked_as = preprocess, name  # type: ignore[method-assign]
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
    return _checked(media, "media", limits)


def _endpoint(pipeline: Pipeline, modality: str, kind: str, tasks: list[Task]) -> Callable[..., Iterator[tuple]]:
    """A named endpoint whose API parameters are exactly the inputs this modality and kind use, in API
    order: media (and question) first, then settings with their defaults (None: the preset's)."""
    p = lambda name, default=inspect.Parameter.empty: inspect.Parameter(  # noqa: E731
        name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default
    )
    params = [p("media")] + ([p("question")] if kind == "qa" else [])
    params += [p("task", tasks[0].id), p("preset", DEFAULT_PRESET), p("max_new_tokens", 0)]
    params += [p("temperature", SAMPLING["temperature"]), p("top_p", SAMPLING["top_p"])]
    params += ([p("frames", 0)] if modality == "video" else []) + [p("adapter", "")]
    names = [param.name for param in params]

    def endpoint(*values: Any) -> Iterator[tuple]:
        yield from respond(pipeline, modality, dict(zip(names, values)))

    endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    endpoint.__name__ = f"{KINDS[kind][2]}_{modality}"
    return endpoint


def _examples(modality: str, kind: str) -> list[list[str]]:
    """Files under examples/<modality>/ (see examples/README.md), each with a question in question mode."""
    folder = EXAMPLES / modality
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() not in (".md", ".txt", ".py"))
    return [[str(f), QUESTIONS[modality]] if kind == "qa" else [str(f)] for f in files]


def _kind_tab(
    pipeline: Pipeline, modality: str, kind: str, tasks: list[Task], media: Any, settings: list, config: dict
) -> tuple[Any, list]:
    """One sub-tab (Caption, or Ask a question): model menu, question, Run and Stop, output, examples.
    Returns the model event and its output boxes."""
    _, button, api = KINDS[kind]
    prefix = f"{modality}-{kind}"
    task = gr.Dropdown(
        [(t.menu_label, t.id) for t in tasks], value=tasks[0].id, label="Model", elem_id=f"{prefix}-task"
    )
    where = "a Hub repo id or a folder on this machine" if pipeline.allow_local_adapters else "a Hub repo id"
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
        run = gr.Button(button, variant="primary", elem_id=f"{prefix}-run")
        stop = gr.Button("Stop", variant="secondary", scale=0, min_width=100, elem_id=f"{prefix}-stop")
    answer = gr.Textbox(label=button, lines=3, buttons=["copy"], elem_id=f"{prefix}-answer")
    info = gr.Markdown(label="Details", elem_id=f"{prefix}-info")
    with gr.Accordion("What the model saw", open=True, elem_id=f"{prefix}-seen"):
        seen = gr.Gallery(
            label=SEEN_LABELS[modality],
            columns=4 if modality == "video" else 1,
            height="max-content",  # every frame shown, none cut
            object_fit="scale-down",  # never blown up past its size
            format="png",
            interactive=False,
            elem_id=f"{prefix}-seen-media",
        )
        tokens = gr.HighlightedText(
            label="Answer tokens, shaded by the model's probability", elem_id=f"{prefix}-tokens"
        )
        described = gr.Markdown(label="What the model saw", elem_id=f"{prefix}-seen-text")
    outputs = [answer, info, seen, tokens, described]
    inputs = [media] + ([question] if question is not None else []) + [task, *settings, adapter]
    # the button is the one way in (Enter in the question box and example clicks press it): it clears the
    # old answer at once in the browser, then runs the endpoint
    cleared = run.click(None, None, outputs, js=f"() => {json.dumps(['', '', *NOTHING_SEEN])}")
    endpoint = _endpoint(pipeline, modality, kind, tasks)
    for component, name in zip(inputs, inspect.signature(endpoint).parameters):
        if not hasattr(component, "checked_as"):  # settings shared by the sub-tabs: once
            _checked(component, name)
    if config["zero_gpu"]:  # a ZeroGPU Space: model calls get a GPU only inside @spaces.GPU
        import spaces

        endpoint = spaces.GPU(duration=120)(endpoint)
    event = cleared.then(
        endpoint,
        inputs,
        outputs,
        api_name=f"{api}_{modality}",
        concurrency_id="model",
        concurrency_limit=config["concurrency"],
        show_progress="full",
        show_progress_on=[answer],
    )
    if question is not None:
        question.submit(None, js=_press(prefix))
    stopped = "(info) => info.startsWith('⏳') || info === 'generating…' ? '⏹ Stopped.' : info"
    stop.click(None, [info], [info], js=stopped, cancels=[event])  # a finished answer's details stay
    rows = _examples(modality, kind)
    if rows and modality == "audio":  # the examples table shows file names only: give each a player
        with gr.Row(elem_id=f"{prefix}-players"):
            for row in rows:
                gr.Audio(row[0], label=Path(row[0]).name, interactive=False)
    if rows:
        _examples_table(prefix, [media] + ([question] if question is not None else []), rows)
    return event, outputs


def _examples_table(prefix: str, inputs: list, rows: list[list[str]]) -> None:
    """Clicking an example fills the inputs, then presses the visible button, which runs the same endpoint,
    task and settings as the user would. (Not gr.Examples: its gr.update rebuilds the image input as a
    plain gr.Image in the session, without `_checked`.)"""
    headers, label = [c.label for c in inputs], "Examples (click one to run it)"
    table = gr.Dataset(
        components=inputs, samples=rows, type="values", headers=headers, label=label, elem_id=f"{prefix}-examples"
    )

    def load_example(row: list[str]) -> Any:
        return row if len(row) > 1 else row[0]

    filled = table.click(load_example, table, inputs, queue=False, show_progress="hidden", api_visibility="private")
    filled.then(None, js=_press(prefix))


def _press(prefix: str) -> str:
    """Browser code that presses the sub-tab's button, so every way in runs the same event."""
    return f"() => {{ document.getElementById('{prefix}-run').click(); }}"


def _tab(pipeline: Pipeline, modality: str, tasks: dict[str, list[Task]], config: dict) -> list:
    """One modality: the media input and shared settings, then a sub-tab per kind of task.
    Returns (model event, output boxes) per sub-tab."""
    with gr.Row():
        with gr.Column():
            media = _media_input(modality, lambda: pipeline.limits)
            with gr.Accordion("Advanced", open=False):
                preset = gr.Radio(
                    [(preset.label, name) for name, preset in PRESETS.items()], value=DEFAULT_PRESET, label="Decoding"
                )
                temperature = gr.Slider(
                    0.1, 2.0, value=SAMPLING["temperature"], step=0.05, label="Temperature (sampling)"
                )
                top_p = gr.Slider(0.05, 1.0, value=SAMPLING["top_p"], step=0.05, label="Top-p (sampling)")
                max_new_tokens = gr.Slider(0, 64, value=0, step=1, label="Max new tokens (0 = the task's own limit)")
                settings = [preset, max_new_tokens, temperature, top_p]
                if modality == "video":
                    settings.append(
                        gr.Slider(0, MAX_FRAMES, value=0, step=1, label="Frames to sample (0 = the task's)")
                    )
        with gr.Column():
            events = []
            with gr.Tabs():
                for kind, kind_tasks in tasks.items():
                    with gr.Tab(KINDS[kind][0], elem_id=f"{modality}-{kind}-tab"):
                        events.append(_kind_tab(pipeline, modality, kind, kind_tasks, media, settings, config))
    outputs = [component for _, components in events for component in components]
    # a new upload clears the answers about the previous one (in the browser: no request is made)
    cleared = json.dumps(["", "", *NOTHING_SEEN] * len(events))
    media.change(None, None, outputs, js=f"() => {cleared}")
    return events


def build(
    pipeline: Pipeline,
    concurrency: int | None = None,
    delete_cache: tuple[int, int] = DELETE_CACHE,
    zero_gpu: bool = False,
) -> gr.Blocks:
    """The whole UI. `concurrency` = requests served at once (default: `pipeline.default_concurrency`)."""
    config = {"concurrency": concurrency or pipeline.default_concurrency, "zero_gpu": zero_gpu}
    # the app reads only what its users uploaded and its own examples, never another path on this machine
    pipeline.limits = replace(pipeline.limits, folders=(get_upload_folder(), str(EXAMPLES)))
    pipeline.any_adapter_models = False  # users' adapters run on the models this app serves, not on what they name
    with gr.Blocks(title="eP-ALM demo", delete_cache=delete_cache) as blocks:
        gr.HTML(f"<style>{SEEN_CSS}</style>", padding=False)  # in the page, however the app is launched
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
        line = gr.Markdown(status(pipeline), elem_id="status")
        events = []
        for modality, tasks in tasks_by_modality(pipeline.tasks.values()).items():
            with gr.Tab(modality.capitalize(), id=modality, elem_id=f"{modality}-tab"):
                events += _tab(pipeline, modality, tasks, config)

        def refresh_status() -> str:
            return status(pipeline)

        def tick() -> tuple[str, Any]:  # every 2 s while a preload runs (and no flicker: no progress shown)
            return status(pipeline), gr.Timer(active=pipeline.preloading_now)

        refresh = dict(api_visibility="private", queue=False, show_progress="hidden")
        for event, _ in events:
            event.then(refresh_status, None, line, **refresh)
        timer = gr.Timer(2.0, active=pipeline.preloading_now)
        timer.tick(tick, None, [line, timer], **refresh)
        blocks.load(refresh_status, None, line, **refresh)
    return blocks


def main(config: ServingConfig, block: bool = True, pipeline: Pipeline | None = None) -> gr.Blocks:
    """Serve the app (`pipeline`: what `start(config)` returned, if it already ran); with `block=False`,
    return the running app (tests stop it with `.close()`)."""
    pipeline = pipeline or start(config)
    concurrency = config.concurrency or pipeline.default_concurrency
    blocks = build(pipeline, concurrency, zero_gpu=config.zero_gpu)
    blocks.queue(max_size=config.queue_size, default_concurrency_limit=concurrency).launch(
        server_name=config.host,
        server_port=config.port,
        share=config.share,
        max_file_size=pipeline.limits.max_file_bytes,  # the limit the pipeline checks too
        allowed_paths=[str(EXAMPLES)],
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return blocks


if __name__ == "__main__":
    main(CONFIG, pipeline=STARTED)

"""The eP-ALM demo: Image, Video and Audio tabs over `epalm.Pipeline` (Gradio 6 Blocks).

    python app.py                 # serves at once; models load on first use
    python app.py --tiny          # tiny random models, no download (answers are meaningless)

Every flag has an environment variable (for Hugging Face Spaces): see `python app.py --help`.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from epalm import MediaLimits, Pipeline, UserError
from epalm.media import media_duration

try:  # ZeroGPU on Hugging Face Spaces: model calls get a GPU only inside @spaces.GPU
    import spaces

    gpu = spaces.GPU(duration=120)
except ImportError:
    gpu = lambda fn: fn  # noqa: E731

log = logging.getLogger("epalm.app")
EXAMPLES = Path(__file__).resolve().parent / "examples"

PRESETS = [("Paper: 3 beams", "paper"), ("Fast: greedy, streamed", "fast"), ("Sampling", "sampling")]
CAPTION_TASKS = {
    "image": [("COCO captions · OPT-2.7B + ViT-B", "image-caption"), ("COCO captions · OPT-6.7B + ViT-L", "image-caption-L")],
    "video": [("MSR-VTT captions · OPT-2.7B + TimeSformer", "video-caption")],
    "audio": [("AudioCaps captions · OPT-2.7B + AST", "audio-caption")],
}
QA_TASKS = {
    "image": [
        ("VQAv2 · OPT-2.7B + ViT-B", "image-vqa"),
        ("GQA · OPT-2.7B + ViT-B", "image-gqa"),
        ("VQAv2 · OPT-6.7B + ViT-L", "image-vqa-L"),
        ("GQA · OPT-6.7B + ViT-L", "image-gqa-L"),
    ],
    "video": [("MSRVTT-QA · OPT-2.7B + TimeSformer", "video-qa-msrvtt"), ("MSVD-QA · OPT-2.7B + TimeSformer", "video-qa-msvd")],
}
MEDIA_NAMES = {"image": "an image", "video": "a video", "audio": "an audio clip"}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="eP-ALM demo (Gradio)")
    parser.add_argument("--device", default=env("EPALM_DEVICE", "auto"), help="cpu, cuda or auto [EPALM_DEVICE]")
    parser.add_argument("--dtype", default=env("EPALM_DTYPE"), help="float32, bfloat16 or float16 [EPALM_DTYPE]")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="[GRADIO_SERVER_NAME]")
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")), help="[GRADIO_SERVER_PORT]")
    parser.add_argument("--share", action="store_true", default=env_flag("EPALM_SHARE"), help="public gradio.live link [EPALM_SHARE]")
    parser.add_argument("--tiny", action="store_true", default=env_flag("EPALM_TINY"), help="tiny random models, no network [EPALM_TINY]")
    parser.add_argument("--preload", nargs="*", default=(env("EPALM_PRELOAD") or "").split(), metavar="TASK", help="load these tasks at start-up, in the background [EPALM_PRELOAD]")
    parser.add_argument("--max-file-size", type=float, default=float(env("EPALM_MAX_FILE_SIZE", "200")), help="upload limit in MB [EPALM_MAX_FILE_SIZE]")
    parser.add_argument("--max-duration", type=float, default=float(env("EPALM_MAX_DURATION", "1800")), help="longest video/audio in seconds [EPALM_MAX_DURATION]")
    parser.add_argument("--concurrency", type=int, default=int(env("EPALM_CONCURRENCY", "0")) or None, help="model calls at once (default 1 on CPU, 2 on GPU) [EPALM_CONCURRENCY]")
    parser.add_argument("--queue-size", type=int, default=int(env("EPALM_QUEUE_SIZE", "32")), help="waiting requests before 'busy' [EPALM_QUEUE_SIZE]")
    return parser.parse_args(argv)


@dataclass
class Demo:
    """The handlers behind the UI and the API; each turns library errors into `gr.Error`s."""

    pipeline: Pipeline
    max_duration: float

    def status(self) -> str:
        loaded = ", ".join(self.pipeline.loaded()) or "nothing yet (models load on first use)"
        mode = " · **tiny random models**" if self.pipeline.random_weights else ""
        return f"Device **{self.pipeline.device.type}** · dtype **{str(self.pipeline.dtype).replace('torch.', '')}**{mode} · loaded: {loaded}"

    def run(
        self, modality: str, media: Any, question: str | None, task: str, preset: str,
        max_new_tokens: float, temperature: float, top_p: float, frames: float | None, progress: gr.Progress,
    ) -> Iterator[tuple[str, str]]:
        if media is None or media == "":
            raise gr.Error(f"Please upload {MEDIA_NAMES[modality]} first.")
        decoding: dict[str, Any] = {}
        if preset == "sampling":
            decoding.update(temperature=float(temperature), top_p=float(top_p))
        if max_new_tokens:
            decoding.update(max_new_tokens=int(max_new_tokens), max_length=None)
        if frames:
            decoding["num_frames"] = int(frames)
        report = lambda message: progress(None, desc=message)  # noqa: E731
        try:
            for answer in self.pipeline.stream(media, task, question, preset=preset, progress=report, **decoding):
                info = f"`{answer.task}` · {answer.timings.summary()} · {answer.device}/{answer.dtype}" if answer.done else "generating…"
                yield answer.text, info
        except UserError as exc:
            raise gr.Error(str(exc)) from exc
        except Exception as exc:
            log.exception("request failed")
            raise gr.Error(f"Something went wrong: {type(exc).__name__}: {exc}") from exc

    def check_duration(self, media: Any, *rest: Any) -> list[dict]:
        """Validator: refuse over-long video/audio before queuing the request."""
        ok, message = True, ""
        if media:
            seconds = media_duration(media)
            if seconds is not None and seconds > self.max_duration:
                ok, message = False, f"This clip is {_duration(seconds)} long; the limit is {_duration(self.max_duration)}."
        return [gr.validate(ok, message)] + [gr.validate(True, "") for _ in rest]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} seconds" if seconds < 120 else f"{seconds / 60:.0f} minutes"


def _handler(demo: Demo, modality: str, with_question: bool) -> Callable[..., Iterator[tuple[str, str]]]:
    """A named, typed endpoint: media (and question) first, then task and decoding settings."""
    default_task = (QA_TASKS if with_question else CAPTION_TASKS)[modality][0][1]

    if with_question:

        def endpoint(media, question: str, task: str = default_task, preset: str = "paper", max_new_tokens: float = 0,
                     temperature: float = 0.7, top_p: float = 0.9, frames: float = 0, progress=gr.Progress()):
            yield from demo.run(modality, media, question, task, preset, max_new_tokens, temperature, top_p, frames, progress)
    else:

        def endpoint(media, task: str = default_task, preset: str = "paper", max_new_tokens: float = 0,
                     temperature: float = 0.7, top_p: float = 0.9, frames: float = 0, progress=gr.Progress()):
            yield from demo.run(modality, media, None, task, preset, max_new_tokens, temperature, top_p, frames, progress)

    endpoint.__name__ = f"{'answer' if with_question else 'caption'}_{modality}"
    return gpu(endpoint)


def _examples(modality: str) -> list[list[str]]:
    """(file, question) pairs from examples/ (see examples/README.md)."""
    folder = EXAMPLES / modality
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() not in (".md", ".txt")) if folder.is_dir() else []
    questions = {"image": "What is in the picture?", "video": "What is happening?"}
    return [[str(f), questions.get(modality, "")] for f in files]


def _tab(demo: Demo, modality: str, concurrency: int, status: gr.Markdown) -> None:
    media_input = {
        "image": lambda: gr.Image(label="Image", sources=["upload", "webcam", "clipboard"], type="filepath", elem_id="image-input"),
        "video": lambda: gr.Video(label="Video", sources=["upload", "webcam"], elem_id="video-input"),
        "audio": lambda: gr.Audio(label="Audio", sources=["upload", "microphone"], type="filepath", elem_id="audio-input"),
    }[modality]
    has_qa = modality in QA_TASKS
    with gr.Row():
        with gr.Column():
            media = media_input()
            mode = gr.Radio([("Caption", "caption"), ("Ask a question", "qa")], value="caption", label="Task", visible=has_qa)
            caption_task = gr.Dropdown(CAPTION_TASKS[modality], value=CAPTION_TASKS[modality][0][1], label="Model")
            qa_task = gr.Dropdown(QA_TASKS.get(modality, [("", "")]), value=QA_TASKS.get(modality, [("", "")])[0][1], label="Model", visible=False)
            question = gr.Textbox(
                label="Question", placeholder="e.g. What is the dog doing?", max_length=300, visible=False, elem_id=f"{modality}-question"
            )
            with gr.Accordion("Advanced", open=False):
                preset = gr.Radio(PRESETS, value="paper", label="Decoding")
                temperature = gr.Slider(0.1, 2.0, value=0.7, step=0.05, label="Temperature (sampling)")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p (sampling)")
                max_new_tokens = gr.Slider(0, 64, value=0, step=1, label="Max new tokens (0 = the paper's max_length 30)")
                frames = gr.Slider(0, 32, value=0, step=1, label="Frames to sample (0 = the task's: 16 caption, 8 QA)", visible=modality == "video")
            caption_button = gr.Button("Caption", variant="primary")
            answer_button = gr.Button("Answer", variant="primary", visible=False)
        with gr.Column():
            answer = gr.Textbox(label="Answer", lines=3, buttons=["copy"], elem_id=f"{modality}-answer")
            info = gr.Markdown(elem_id=f"{modality}-info")
    settings = [preset, max_new_tokens, temperature, top_p, frames]
    events = dict(concurrency_id="model", concurrency_limit=concurrency, show_progress="minimal")
    caption_event = caption_button.click(
        _handler(demo, modality, False), [media, caption_task, *settings], [answer, info], api_name=f"caption_{modality}",
        validator=demo.check_duration if modality != "image" else None, **events,
    )
    caption_event.then(demo.status, None, status, api_visibility="private", queue=False)
    if has_qa:
        answer_event = answer_button.click(
            _handler(demo, modality, True), [media, question, qa_task, *settings], [answer, info], api_name=f"answer_{modality}",
            validator=demo.check_duration if modality != "image" else None, **events,
        )
        answer_event.then(demo.status, None, status, api_visibility="private", queue=False)
        question.submit(
            _handler(demo, modality, True), [media, question, qa_task, *settings], [answer, info], api_visibility="private", **events
        )
        mode.change(
            lambda m: [gr.update(visible=(m == "caption") == shows_caption) for shows_caption in (True, False, True, False, False)],
            mode, [caption_task, qa_task, caption_button, answer_button, question], api_visibility="private", queue=False,
        )
    examples = _examples(modality)
    if examples:
        gr.Examples(
            examples=[row if has_qa else row[:1] for row in examples],
            inputs=[media, question] if has_qa else [media],
            outputs=[answer, info],
            fn=_example_fn(demo, modality),
            cache_examples=True,
            cache_mode="lazy",
            api_visibility="private",
            label="Examples (click one)",
        )


def _example_fn(demo: Demo, modality: str) -> Callable:
    """Examples run the paper setting: a caption, or an answer when the row has a question."""
    caption_task = CAPTION_TASKS[modality][0][1]
    qa_task = QA_TASKS[modality][0][1] if modality in QA_TASKS else None

    def example(media, question=None, progress=gr.Progress()):
        task = qa_task if question and qa_task else caption_task
        yield from demo.run(modality, media, question or None, task, "paper", 0, 0.7, 0.9, 0, progress)

    return gpu(example)


def build(pipeline: Pipeline, max_duration: float = 1800, concurrency: int | None = None) -> gr.Blocks:
    """The whole UI. `concurrency` = model calls at once (default: 1 on CPU, 2 on GPU)."""
    demo = Demo(pipeline, max_duration)
    concurrency = concurrency or (2 if pipeline.device.type == "cuda" else 1)
    with gr.Blocks(title="eP-ALM demo") as blocks:
        gr.Markdown(
            "# eP-ALM: Efficient Perceptual Augmentation of Language Models\n"
            "A frozen OPT language model reads frozen image, video and audio encoders through a few million trained "
            "parameters ([paper](https://arxiv.org/abs/2303.11403), ICCV 2023). Upload a file, ask for a caption or a question."
        )
        if pipeline.random_weights:
            gr.Markdown("⚠️ **Smoke mode (`--tiny`)**: tiny random models, nothing downloaded. The answers are meaningless.", elem_id="tiny-banner")
        status = gr.Markdown(demo.status(), elem_id="status")
        for modality in ("image", "video", "audio"):
            with gr.Tab(modality.capitalize(), id=modality, elem_id=f"{modality}-tab"):
                _tab(demo, modality, concurrency, status)
        blocks.load(demo.status, None, status, api_visibility="private", queue=False)
    return blocks


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    limits = MediaLimits(max_file_bytes=int(args.max_file_size * 2**20))
    pipeline = Pipeline(device=args.device, dtype=args.dtype, tiny=args.tiny, limits=limits)
    if args.preload:  # in the background: the page is served at once
        threading.Thread(target=pipeline.preload, args=(args.preload,), daemon=True).start()
    blocks = build(pipeline, args.max_duration, args.concurrency)
    blocks.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency or 1).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size=f"{args.max_file_size:g}mb",
        allowed_paths=[str(EXAMPLES)],
    )


if __name__ == "__main__":
    main()

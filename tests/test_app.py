"""The Gradio app in --tiny mode: every endpoint through gradio_client, streaming, errors, start-up."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import app as demo_app
from epalm import Pipeline

from conftest import write_video


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(pipeline: Pipeline, **kwargs):
    blocks = demo_app.build(pipeline, max_duration=kwargs.pop("max_duration", 1800))
    port = free_port()
    blocks.queue(max_size=16).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
        max_file_size=kwargs.pop("max_file_size", None), allowed_paths=[str(demo_app.EXAMPLES)],
    )
    return blocks, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def tiny_app():
    pipeline = Pipeline(device="cpu", tiny=True)
    blocks, url = serve(pipeline)
    yield pipeline, url
    blocks.close()


@pytest.fixture(scope="module")
def client(tiny_app):
    return Client(tiny_app[1], verbose=False)


def test_page_is_served_before_any_model_loads():
    pipeline = Pipeline(device="cpu", tiny=True)
    started = time.perf_counter()
    blocks, url = serve(pipeline)
    try:
        page = urllib.request.urlopen(url, timeout=30).read().decode()
        assert "eP-ALM" in page or "gradio" in page.lower()
        assert pipeline.loaded() == [], "nothing is loaded to serve the page"
        assert time.perf_counter() - started < 60
    finally:
        blocks.close()


def test_every_named_endpoint_answers_with_the_paper_defaults(client, media_files):
    image, video, audio = (handle_file(str(media_files[m])) for m in ("image", "video", "audio"))
    calls = [
        client.predict(image, api_name="/caption_image"),
        client.predict(image, "What is this?", api_name="/answer_image"),
        client.predict(video, api_name="/caption_video"),
        client.predict(video, "what is happening", "video-qa-msvd", api_name="/answer_video"),
        client.predict(audio, api_name="/caption_audio"),
    ]
    for answer, info in calls:
        assert isinstance(answer, str) and "tokens" in info and "cpu/float32" in info


def test_api_lists_the_documented_parameters(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/caption_image", "/answer_image", "/caption_video", "/answer_video", "/caption_audio"} <= set(api)
    names = [p["parameter_name"] for p in api["/answer_image"]["parameters"]]
    assert names[:3] == ["media", "question", "task"] and "preset" in names
    assert all(p["parameter_has_default"] for p in api["/answer_image"]["parameters"][2:])


def test_greedy_answers_stream(client, media_files):
    job = client.submit(handle_file(str(media_files["image"])), preset="fast", max_new_tokens=12, api_name="/caption_image")
    final = job.result(timeout=120)
    outputs = job.outputs()
    assert len(outputs) >= 3, "several partial outputs, then the final one"
    assert all(info == "generating…" for _, info in outputs[:-1]) and "tokens/s" in final[1]
    texts = [answer for answer, _ in outputs]
    assert all(b.startswith(a) for a, b in zip(texts[:-2], texts[1:-1])) and final[0] == texts[-1]


@pytest.mark.parametrize(
    "args, api_name, message",
    [
        ((None,), "/caption_image", "Please upload an image first"),
        ((None, "why?"), "/answer_video", "Please upload a video first"),
        (("IMAGE", "  "), "/answer_image", "Please type a question"),
        (("IMAGE", "why " * 100), "/answer_image", "characters long; the limit is 300"),
        (("TEXT",), "/caption_image", ""),
        (("TEXT",), "/caption_audio", ""),
    ],
)
def test_user_errors_become_clear_messages(client, media_files, tmp_path, args, api_name, message):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    values = {"IMAGE": handle_file(str(media_files["image"])), "TEXT": handle_file(str(text))}
    args = tuple(values.get(a, a) if isinstance(a, str) else a for a in args)
    with pytest.raises(AppError) as error:
        client.predict(*args, api_name=api_name)
    shown = str(error.value)
    assert message in shown and "Traceback" not in shown and len(shown) > 10


@pytest.mark.parametrize(
    "limits, message",
    [({"max_file_size": 20_000}, "(?i)size|large|limit"), ({}, "This clip is 5 seconds long; the limit is 2 seconds")],
    ids=["file-size", "duration"],
)
def test_too_large_and_too_long_uploads_are_refused(tmp_path, limits, message):
    long_video = write_video(tmp_path / "long.mp4", frames=40, fps=8)  # 5 s, about 30 kB
    blocks, url = serve(Pipeline(device="cpu", tiny=True), max_duration=2.0, **limits)
    try:
        with pytest.raises(Exception, match=message):
            Client(url, verbose=False).predict(handle_file(str(long_video)), api_name="/caption_video")
    finally:
        blocks.close()


def test_missing_weights_offline_name_the_repo(media_files, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    blocks, url = serve(Pipeline(device="cpu"))
    try:
        with pytest.raises(AppError, match="facebook/opt-2.7b.*not in the local Hugging Face cache"):
            Client(url, verbose=False).predict(handle_file(str(media_files["image"])), api_name="/caption_image")
    finally:
        blocks.close()


def test_out_of_memory_is_said(tiny_app, client, media_files, monkeypatch):
    pipeline, _ = tiny_app
    encoder = pipeline.encoder(pipeline.task("audio-caption"))

    def explode(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(encoder, "forward", explode)
    with pytest.raises(AppError, match="Out of memory"):
        client.predict(handle_file(str(media_files["audio"])), api_name="/caption_audio")


def test_flags_have_environment_equivalents(monkeypatch):
    monkeypatch.setenv("EPALM_TINY", "1")
    monkeypatch.setenv("EPALM_DEVICE", "cpu")
    monkeypatch.setenv("EPALM_CONCURRENCY", "3")
    monkeypatch.setenv("EPALM_PRELOAD", "image-caption audio-caption")
    args = demo_app.parse_args([])
    assert args.tiny and args.device == "cpu" and args.concurrency == 3 and args.preload == ["image-caption", "audio-caption"]
    assert demo_app.parse_args(["--port", "9999", "--dtype", "bfloat16"]).port == 9999


def test_info_line_tells_a_long_question_its_limit_and_beams_their_timing(client, media_files):
    question = "what is the man holding in the picture and why " * 3
    answer, info = client.predict(handle_file(str(media_files["image"])), question, api_name="/answer_image")
    assert "Long question" in info and "Max new tokens" in info
    assert "3-beam search" in info and "first token" not in info

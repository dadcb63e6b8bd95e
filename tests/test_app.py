"""The Gradio app in --tiny mode: every endpoint through gradio_client, streaming, errors, start-up."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app as demo_app
from epalm import MediaLimits, Pipeline, ServingConfig
from epalm.__main__ import main as cli
from epalm.config import MAX_BATCH_ROWS
from epalm.image import CLIP_MEAN, CLIP_STD, prepare_image
from epalm.tasks import tasks_by_modality
from epalm.video import frame_indices

from conftest import ROOT, write_image, write_video, write_wav
from test_adapters import saved_tiny_adapter

ENDPOINTS = {"/caption_image", "/answer_image", "/caption_video", "/answer_video", "/caption_audio"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(pipeline: Pipeline, max_file_size: int | None = None, **build_args):
    blocks = demo_app.build(pipeline, **build_args)
    port = free_port()
    blocks.queue(max_size=16).launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        max_file_size=max_file_size,
        allowed_paths=[str(demo_app.EXAMPLES)],
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
        assert "eP-ALM: Efficient Perceptual Augmentation of Language Models" in page, "the app's own page"
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
    for answer, info, *seen in calls:
        assert isinstance(answer, str) and "tokens" in info and "cpu/float32" in info
        assert len(seen) == 3, "then what the model saw: media, tokens, description"


def test_endpoints_return_what_the_model_saw_after_the_answer(client, media_files):
    image = handle_file(str(media_files["image"]))
    answer, info, media, tokens, described = client.predict(image, "What is this?", api_name="/answer_image")
    [picture] = media
    seen = np.asarray(Image.open(picture["image"]).convert("RGB"))
    encoder_input = prepare_image(str(media_files["image"]))  # what the tiny ViT received
    assert torch.equal(TF.normalize(TF.to_tensor(seen), CLIP_MEAN, CLIP_STD), encoder_input), "a lossless PNG of it"
    assert "64×48" in picture["caption"] and "224×224" in described
    assert "".join(t["token"] for t in tokens).replace("</s>", "").strip() == answer
    assert all(0 < t["class_or_confidence"] <= 1 for t in tokens)
    assert "what&nbsp;is&nbsp;this??&lt;/a&gt;" in described.lower() and "| # | beam | score | p |" in described
    video = handle_file(str(media_files["video"]))
    *_, frames, tokens, described = client.predict(video, "what is up", "video-qa-msvd", api_name="/answer_video")
    assert [f["caption"] for f in frames] == [f"{i / 8:.2f} s (frame {i})" for i in frame_indices(8, 12)]
    audio = handle_file(str(media_files["audio"]))
    *_, spectrogram, tokens, described = client.predict(audio, api_name="/caption_audio")
    assert len(spectrogram) == 1 and Image.open(spectrogram[0]["image"]).size == (1024, 256)
    assert "padded with silence" in spectrogram[0]["caption"]


def test_a_streamed_answer_writes_what_the_model_saw_once(client, media_files, monkeypatch):
    """The pictures of a response are written once (they were again with every partial answer's first and
    the final one, and beside them a JSON nobody reads), in a folder that is deleted in time."""
    folders = []

    def recorded(root: Path, keep_s: float) -> Path:
        folders.append(demo_app.response_folder.__wrapped__(root, keep_s))
        return folders[-1]

    recorded.__wrapped__ = demo_app.response_folder
    monkeypatch.setattr(demo_app, "response_folder", recorded)
    image = handle_file(str(media_files["image"]))
    answer, *_ = client.predict(image, preset="fast", max_new_tokens=6, api_name="/caption_image")
    assert len(folders) == 1 and [path.name for path in folders[0].iterdir()] == ["input.png"]
    assert folders[0].parent == Path(get_upload_folder()) / "epalm-seen"


def test_api_lists_the_documented_parameters_and_named_outputs(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == ENDPOINTS and not api["unnamed_endpoints"]
    for name, endpoint in api["named_endpoints"].items():
        names = [p["parameter_name"] for p in endpoint["parameters"]]
        assert names[:2] == (["media", "question"] if name.startswith("/answer") else ["media", "task"])
        assert ("frames" in names) == name.endswith("_video"), "frames only where it is used"
        assert all(p["parameter_has_default"] for p in endpoint["parameters"][2:])
        assert names[-1] == "adapter" and endpoint["parameters"][-1]["parameter_default"] == "", "added last"
        seen = demo_app.SEEN_LABELS[name.split("_")[1]]
        assert [r["label"] for r in endpoint["returns"]] == [
            "Answer" if name.startswith("/answer") else "Caption",
            "Details",
            seen,
            "Answer tokens, shaded by the model's probability",
            "What the model saw",
        ]


def test_a_task_added_to_the_registry_appears_in_the_menu_and_the_api(tmp_path, monkeypatch, media_files):
    registry = (ROOT / "checkpoints" / "tasks.yaml").read_text()
    extra = registry.replace(
        "\n  image-vqa:\n",
        "\n  image-vqa-mine:\n    title: My VQA\n    label: MyVQA\n    modality: image\n"
        "    kind: qa\n    lm: *opt27\n    encoder: *vit_b\n    preprocess: *image_pre\n    injection: *inject_base\n"
        "    text: *qa_text\n    generation: *qa_paper\n"
        "    adapter: {<<: *space, filename: mine.pth}\n\n  image-vqa:\n",
    )
    (tmp_path / "tasks.yaml").write_text(extra)
    monkeypatch.setenv("EPALM_TASKS", str(tmp_path / "tasks.yaml"))
    blocks, url = serve(Pipeline(device="cpu", tiny=True))
    try:
        menus = [c["props"] for c in blocks.config["components"] if c["props"].get("elem_id") == "image-qa-task"]
        assert ("MyVQA · OPT-2.7B + ViT-B/16", "image-vqa-mine") in [tuple(choice) for choice in menus[0]["choices"]]
        client = Client(url, verbose=False)
        task = next(
            p
            for p in client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/answer_image"][
                "parameters"
            ]
            if p["parameter_name"] == "task"
        )
        assert "image-vqa-mine" in task["type"]["enum"]
        answer, info, *_ = client.predict(
            handle_file(str(media_files["image"])), "why?", "image-vqa-mine", api_name="/answer_image"
        )
        assert "`image-vqa-mine`" in info
    finally:
        blocks.close()


def test_greedy_answers_stream(client, media_files):
    job = client.submit(
        handle_file(str(media_files["image"])), preset="fast", max_new_tokens=12, api_name="/caption_image"
    )
    final = job.result(timeout=120)
    outputs = job.outputs()
    outputs = [output for output in outputs if not output[1].startswith("⏳")]  # load stages (first call only)
    assert len(outputs) >= 3, "several partial outputs, then the final one"
    assert all(output[1] == "generating…" for output in outputs[:-1]) and "tokens/s" in final[1]
    assert len(outputs[0][2]) == 1 and outputs[0][3] == [], "the media at once, the tokens at the end"
    assert len(final[3]) == 12 and len(final[2]) == 1
    texts = [output[0] for output in outputs]
    assert all(b.startswith(a) for a, b in zip(texts[:-2], texts[1:-1])) and final[0] == texts[-1]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "args, api_name, message",
    [
        ((None,), "/caption_image", "Please upload an image first"),
        ((None, "why?"), "/answer_video", "Please upload a video first"),
        (("IMAGE", "  "), "/answer_image", "Please type a question"),
        (("IMAGE", "why " * 100), "/answer_image", "characters long; the limit is 300"),
        (("notes.png",), "/caption_image", "Could not read this file as an image"),
        (("empty.png",), "/caption_image", "The file is empty"),
        (("noise.jpg",), "/caption_image", "Could not read this file as an image"),
        (("VIDEO",), "/caption_image", "Could not read this file as an image"),
        (("AUDIO",), "/caption_image", "Could not read this file as an image"),
        (("bomb.png",), "/caption_image", "the limit is 100 megapixels"),
        (("notes.wav",), "/caption_audio", "Could not read this file as audio"),
        (("AUDIO",), "/caption_video", "no video track"),
    ],
)
def test_user_errors_become_clear_messages(client, media_files, tmp_path, args, api_name, message):
    files = {
        "IMAGE": media_files["image"],
        "VIDEO": media_files["video"],
        "AUDIO": media_files["audio"],
        "notes.png": _write(tmp_path / "notes.png", b"not a picture"),
        "notes.wav": _write(tmp_path / "notes.wav", b"la la"),
        "empty.png": _write(tmp_path / "empty.png", b""),
        "noise.jpg": _write(tmp_path / "noise.jpg", np.random.default_rng(0).bytes(5000)),
        "bomb.png": _write(tmp_path / "bomb.png", png_header_only(20_000, 20_000)),
    }
    args = tuple(handle_file(str(files[a])) if a in files else a for a in args)
    job = client.submit(*args, api_name=api_name)
    with pytest.raises(AppError) as error:
        job.result(timeout=120)
    shown = str(error.value)
    assert message in shown and "Traceback" not in shown and "upstream" not in shown
    expected = ("", f"⚠️ {shown}", [], [], "")
    deadline = time.time() + 10  # the client may record the last output just after the error
    while job.outputs()[-1:] != [expected] and time.time() < deadline:
        time.sleep(0.05)
    assert job.outputs()[-1] == expected, "the message stays where the answer goes, with no answer"


@pytest.mark.parametrize("api_name", sorted(ENDPOINTS))
def test_out_of_range_settings_are_readable_on_every_endpoint(client, media_files, api_name):
    modality = api_name.split("_")[1]
    args = [handle_file(str(media_files[modality]))] + (["why?"] if api_name.startswith("/answer") else [])
    with pytest.raises(AppError, match="greater than maximum value 64"):
        client.predict(*args, max_new_tokens=500, api_name=api_name)
    with pytest.raises(AppError, match="unknown decoding preset|not in the list of choices|Value: turbo"):
        client.predict(*args, preset="turbo", api_name=api_name)


@pytest.mark.parametrize(
    "limits, max_file_size, message",
    [
        (MediaLimits(), 20_000, "(?i)size|large|limit"),
        (MediaLimits(max_clip_seconds=2.0), None, "This video is 5.0 seconds long; the limit is 2.0 seconds"),
    ],
    ids=["file-size", "duration"],
)
@pytest.mark.parametrize("api_name", ["/caption_video", "/answer_video"])
def test_too_large_and_too_long_uploads_are_refused(tmp_path, limits, max_file_size, message, api_name):
    long_video = write_video(tmp_path / "long.mp4", frames=40, fps=8)  # 5 s, about 30 kB
    pipeline = Pipeline(device="cpu", tiny=True, limits=limits)
    blocks, url = serve(pipeline, max_file_size=max_file_size)
    try:
        args = [handle_file(str(long_video))] + (["why?"] if api_name == "/answer_video" else [])
        with pytest.raises(Exception, match=message):
            Client(url, verbose=False).predict(*args, api_name=api_name)
        assert pipeline.loaded() == [], "refused before any model loads"
    finally:
        blocks.close()


def test_only_the_documented_endpoints_run_models(tiny_app):
    """Every event that runs a model is one of the five endpoints (the question box's Enter included);
    the other server-side events only load an example's values or refresh the status line."""
    blocks = demo_app.build(tiny_app[0])
    endpoints = {}
    for fn in blocks.fns.values():
        if fn.fn is None:
            continue
        name = fn.fn.__name__
        assert name in {"load_example", "refresh_status", "tick"} or f"/{fn.api_name}" in ENDPOINTS, name
        if f"/{fn.api_name}" in ENDPOINTS:
            endpoints[fn.api_name] = fn
    assert {f"/{name}" for name in endpoints} == ENDPOINTS
    config = blocks.config
    dependencies = {d["id"]: d for d in config["dependencies"]}
    ids = {c["id"]: c["props"].get("elem_id") for c in config["components"]}
    for dependency in config["dependencies"]:
        if f"/{dependency['api_name']}" in ENDPOINTS:  # runs after its button's click (which clears the old answer)
            verb, modality = dependency["api_name"].split("_")
            before = dependencies[dependency["trigger_after"]]
            prefix = f"{modality}-{'qa' if verb == 'answer' else 'caption'}"
            assert not before["backend_fn"] and [(ids[i], e) for i, e in before["targets"]] == [
                (f"{prefix}-run", "click")
            ]
    submits = [d for d in config["dependencies"] if any(event == "submit" for _, event in d["targets"])]
    assert len(submits) == 2, "the image and video question boxes"
    assert all(not d["backend_fn"] and "-qa-run').click()" in d["js"] for d in submits), "Enter presses the button"


def test_the_stop_button_cancels_its_event(tiny_app):
    blocks = demo_app.build(tiny_app[0])
    config = blocks.config
    ids = {c["id"]: c["props"].get("elem_id") for c in config["components"]}
    by_api = {d["api_name"]: d["id"] for d in config["dependencies"]}
    for dependency in config["dependencies"]:
        if dependency["cancels"]:
            stop = ids[dependency["targets"][0][0]]
            modality, kind = stop.split("-")[:2]
            assert dependency["cancels"] == [by_api[f"{demo_app.KINDS[kind][2]}_{modality}"]]
    stops = [d for d in config["dependencies"] if d["cancels"]]
    assert len(stops) == len(ENDPOINTS)


def test_audio_examples_can_be_played_before_they_are_run(tiny_app):
    config = demo_app.build(tiny_app[0]).config
    players = {
        c["props"]["label"]: c["props"]["value"]
        for c in config["components"]
        if c["type"] == "audio" and c["props"].get("interactive") is False
    }
    examples = sorted(p.name for p in (demo_app.EXAMPLES / "audio").iterdir() if p.suffix != ".md")
    assert sorted(players) == examples and all(Path(value["path"]).is_file() for value in players.values())


def test_what_the_request_is_doing_is_shown_before_the_answer(media_files):
    pipeline = Pipeline(device="cpu", tiny=True)
    request = dict(
        media=str(media_files["image"]),
        task="image-caption",
        preset="fast",
        max_new_tokens=2,
        temperature=0.7,
        top_p=0.9,
        adapter="",
    )
    outputs = list(demo_app.respond(pipeline, "image", request))
    stages = [info for answer, info, *_ in outputs if isinstance(info, str) and info.startswith("⏳")]
    assert stages and outputs[0][1] == stages[0] and "tokens/s" in outputs[-1][1]
    assert all(re.match(r"⏳ (Load(ing|ed)|Packing the weights of|Encoding the image)", stage) for stage in stages)
    assert stages[-1] == "⏳ Encoding the image…", "the stage that runs is shown, until the first token"
    again = list(demo_app.respond(pipeline, "image", request))
    assert [info for _, info, *_ in again if info.startswith("⏳")] == ["⏳ Encoding the image…"], "nothing to load"


def test_a_load_that_fails_still_ends_the_request_with_its_message(media_files, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    request = dict(
        media=str(media_files["image"]), task="image-caption", preset="fast", max_new_tokens=2, temperature=0.7
    )
    outputs = []
    with pytest.raises(demo_app.gr.Error, match="the adapter of image-caption") as ended:
        for output in demo_app.respond(Pipeline(device="cpu"), "image", {**request, "top_p": 0.9, "adapter": ""}):
            outputs.append(output)
    assert outputs[-1][0] == "" and outputs[-1][1].startswith("⚠️ Cannot get the adapter of image-caption")
    assert "`" not in ended.value.message, "the toast shows no raw Markdown"


def test_the_status_line_names_models_for_people_and_reports_preloads(media_files, tmp_path, monkeypatch):
    pipeline = Pipeline(device="cpu", tiny=True)
    assert "tiny random stand-ins" in demo_app.status(pipeline) and "nothing yet" in demo_app.status(pipeline)
    pipeline.start_preload(["audio-caption"]).join(timeout=120)
    line = demo_app.status(pipeline)
    assert "**tiny random stand-ins** loaded for: OPT-2.7B language model, AST audio encoder" in line
    assert "facebook/" not in line and "preload" not in line
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    real = Pipeline(device="cpu")
    real.start_preload(["image-caption"]).join(timeout=120)
    assert demo_app.status(real).endswith("preload of `image-caption`: failed"), "the details are the request's"
    failure = real.preloading["image-caption"]
    assert re.match(r"failed: Cannot get the adapter of image-caption: .* is not downloaded", failure), failure
    assert str(tmp_path) not in failure, "where the server keeps its files is not shown"


def test_missing_weights_offline_name_the_repo(media_files, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    blocks, url = serve(Pipeline(device="cpu"))
    try:
        with pytest.raises(
            AppError, match="ePALM_caption/checkpoint_best.pth in the Space mshukor/eP-ALM is not downloaded"
        ):
            job = Client(url, verbose=False).submit(handle_file(str(media_files["image"])), api_name="/caption_image")
            job.result(timeout=120)
    finally:
        blocks.close()


def test_out_of_memory_is_said(tiny_app, client, media_files, monkeypatch):
    pipeline, _ = tiny_app
    encoder = pipeline.encoder(pipeline.task("audio-caption"))

    def explode(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(encoder, "forward", explode)
    monkeypatch.setattr(pipeline.features, "size", 0)  # the encoder must run: the clip's features may be kept
    with pytest.raises(AppError, match="Out of memory"):
        client.predict(handle_file(str(media_files["audio"])), api_name="/caption_audio")


def test_user_errors_are_logged_as_one_line(client, tmp_path, capfd, caplog):
    bad = _write(tmp_path / "bad.png", b"not a picture")
    caplog.set_level("INFO", logger="epalm.app")
    with pytest.raises(AppError):
        client.predict(handle_file(str(bad)), api_name="/caption_image")
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err + caplog.text
    assert [r.getMessage() for r in caplog.records if r.name == "epalm.app"] == [
        "refused a request (image): Could not read this file as an image: it is not a format Pillow knows "
        "(JPEG, PNG, WebP, GIF, BMP, TIFF...) or it is damaged."
    ]


@pytest.mark.parametrize(
    "flags, env, expected",
    [
        ([], {}, (True, MAX_BATCH_ROWS)),
        (["--no-batching", "--max-batch-rows", "5"], {}, (False, 5)),
        ([], {"EPALM_BATCHING": "0", "EPALM_MAX_BATCH_ROWS": "7"}, (False, 7)),
        ([], {"SPACES_ZERO_GPU": "true"}, (False, MAX_BATCH_ROWS)),
    ],
)
def test_batching_flags_and_variables_reach_the_library(monkeypatch, flags, env, expected):
    """One reading of the settings, the app's and the library's; only a ZeroGPU Space (SPACES_ZERO_GPU, not the
    `spaces` package being installed) turns batching off by itself."""
    for name in ("EPALM_BATCHING", "EPALM_MAX_BATCH_ROWS", "SPACES_ZERO_GPU"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pipeline = demo_app.start(ServingConfig.parse(["--tiny", "--device", "cpu", "--preload", *flags]))
    assert (pipeline.batching, pipeline.max_batch_rows) == expected


def test_the_first_task_starts_loading_before_gradio_is_imported(monkeypatch):
    """`python app.py` starts the preload, then imports gradio (seconds) while the models load."""
    import runpy
    import threading

    loading = threading.Event()
    monkeypatch.setattr(Pipeline, "preload", lambda self, task_ids, progress=None: loading.set())
    monkeypatch.setitem(sys.modules, "gradio", None)  # importing gradio fails: nothing after it runs
    monkeypatch.setattr(sys, "argv", ["app.py", "--tiny", "--device", "cpu"])
    with pytest.raises(ImportError, match="gradio"):
        runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
    assert loading.wait(10), "the page's first task was loading when gradio's import began"


def test_help_answers_without_importing_gradio_or_torch():
    code = (
        "import runpy, sys; sys.argv = ['app.py', '--help']\ntry:\n    runpy.run_path('app.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\nprint(sorted({'gradio', 'torch'} & set(sys.modules)))"
    )
    env = {**os.environ, "COLUMNS": "300"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert out.stdout.strip().endswith("[]"), out.stdout + out.stderr
    assert "default: 7860]" in out.stdout and "default: 1800.0]" in out.stdout and "default: 200.0]" in out.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--preload", "nope"], "error: unknown task(s) to preload: nope; known tasks: image-caption"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--dtype", "float64"], "error: "),
    ],
)
def test_bad_start_up_flags_are_one_line_errors(flags, message):
    with pytest.raises(SystemExit) as exit_:
        demo_app.main(ServingConfig.parse(["--tiny", *flags]), block=False)
    assert str(exit_.value).startswith(message) and "\n" not in str(exit_.value)


def test_a_fractional_file_size_limit_starts_and_holds(tmp_path, media_files):
    port = free_port()
    config = ServingConfig.parse(["--tiny", "--max-file-size", "0.05", "--port", str(port), "--device", "cpu"])
    blocks = demo_app.main(config, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        big = write_wav(tmp_path / "big.wav", seconds=2.0)  # 62 kB: over 0.05 MB
        with pytest.raises(Exception, match="(?i)size|large|limit"):
            client.predict(handle_file(str(big)), api_name="/caption_audio")
        answer, info, *_ = client.predict(
            handle_file(str(media_files["audio"])), preset="fast", max_new_tokens=2, api_name="/caption_audio"
        )
        assert "tokens/s" in info
        with pytest.raises(AppError, match="is not a Hub repo id .*; adapter folders on this machine are not accepted"):
            flagless = write_wav(tmp_path / "flagless.wav", seconds=0.5, freq=660.0)
            client.predict(handle_file(str(flagless)), adapter=str(tmp_path), api_name="/caption_audio")
    finally:
        blocks.close()


def test_old_uploads_are_deleted(media_files, tmp_path):
    blocks, url = serve(Pipeline(device="cpu", tiny=True), delete_cache=(1, 1))
    try:
        client = Client(url, verbose=False)
        client.predict(
            handle_file(str(media_files["image"])), preset="fast", max_new_tokens=2, api_name="/caption_image"
        )
        uploads = list(Path(get_upload_folder()).rglob("photo.jpg"))
        assert uploads, "the upload is in the cache while fresh"
        deadline = time.time() + 20
        while any(p.exists() for p in uploads) and time.time() < deadline:
            time.sleep(0.5)
        assert not any(p.exists() for p in uploads)
    finally:
        blocks.close()


# -- image uploads: the original file goes to epalm --------------------------------------------------------------


def _rgba(p: Path) -> Path:
    pixels = np.random.default_rng(1).integers(0, 255, (40, 50, 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(p / "rgba.png")
    return p / "rgba.png"


def _palette(p: Path) -> Path:
    image = Image.new("P", (30, 20), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.save(p / "palette.png", transparency=0)
    return p / "palette.png"


def _grey16(p: Path) -> Path:
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(p / "grey16.png")
    return p / "grey16.png"


def _cmyk(p: Path) -> Path:
    Image.new("CMYK", (50, 40), (0, 128, 255, 20)).save(p / "cmyk.jpg")
    return p / "cmyk.jpg"


def _exif_rotated(p: Path) -> Path:
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:10, :10] = (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(pixels).save(p / "rotated.jpg", exif=exif, quality=95)
    return p / "rotated.jpg"


@pytest.mark.parametrize("make", [_rgba, _palette, _grey16, _cmyk, _exif_rotated], ids=lambda f: f.__name__.strip("_"))
def test_the_app_sees_the_same_pixels_as_the_cli(tiny_app, client, tmp_path, monkeypatch, make):
    pipeline, _ = tiny_app
    original = make(tmp_path)
    received = []
    stream = pipeline.stream

    def recording(media, *args, **kwargs):
        received.append(media)
        return stream(media, *args, **kwargs)

    monkeypatch.setattr(pipeline, "stream", recording)
    client.predict(handle_file(str(original)), preset="fast", max_new_tokens=2, api_name="/caption_image")
    assert Path(received[0]).read_bytes() == original.read_bytes(), "the upload itself, not a re-encoded copy"
    assert torch.equal(prepare_image(received[0]), prepare_image(original))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height (no pixel data worth decoding)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def big_png(path: Path, side: int) -> Path:
    """A valid side × side transparent RGBA PNG, compressed row by row (never held in memory whole)."""
    compressor, row, parts = zlib.compressobj(9), b"\x00" * (1 + 4 * side), []
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )
    return path


def _memory_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def test_an_oversized_image_is_refused_from_its_header(client, tmp_path):
    """12000 × 12000 RGBA (144 megapixels, 576 MB decoded): refused without decoding it."""
    huge = big_png(tmp_path / "huge.png", 12_000)
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's memory high-water mark
    idle = _memory_kb("VmRSS")
    started = time.perf_counter()
    with pytest.raises(AppError, match="12000×12000 pixels; the limit is 100 megapixels"):
        client.predict(handle_file(str(huge)), api_name="/caption_image")
    assert _memory_kb("VmHWM") - idle < 100 * 1024, "peak memory of the server stays within 100 MB of idle"
    assert time.perf_counter() - started < 30


@pytest.mark.parametrize("api_name", sorted(ENDPOINTS))
def test_the_queue_bound_holds_under_a_burst(media_files, monkeypatch, api_name):
    """60 clients join at once while the model is busy: the queue takes `max_size`, the rest are told it is full."""
    import json
    import threading
    import urllib.error

    import httpx

    pipeline = Pipeline(device="cpu", tiny=True)
    release, lock, inside = threading.Event(), threading.Lock(), []

    def busy(*args, **kwargs):
        with lock:
            inside.append(len(inside) + 1)  # how many calls were in the model at once, as each entered
        release.wait(60)  # the model stays busy until the burst is over
        return iter(())

    monkeypatch.setattr(pipeline, "stream", busy)
    blocks = demo_app.build(pipeline)
    port = free_port()
    blocks.queue(max_size=8).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        verb, modality = api_name.strip("/").split("_")
        kind = "qa" if verb == "answer" else "caption"
        fn_index = next(i for i, fn in blocks.fns.items() if f"/{fn.api_name}" == api_name)
        with open(media_files[modality], "rb") as upload:
            path = httpx.post(f"http://127.0.0.1:{port}/gradio_api/upload", files={"files": upload}).json()[0]
        media = {"path": path, "meta": {"_type": "gradio.FileData"}}
        task = tasks_by_modality(pipeline.tasks.values())[modality][kind][0].id
        data = [media] + (["why?"] if kind == "qa" else []) + [task, "paper", 0, 0.7, 0.9]
        data += ([0] if modality == "video" else []) + [""]
        statuses: list[int] = []

        def join(i: int) -> None:
            body = json.dumps(
                {"data": data, "fn_index": fn_index, "session_hash": f"s{i}", "event_data": None, "trigger_id": None}
            )
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/gradio_api/queue/join", body.encode(), {"Content-Type": "application/json"}
            )
            try:
                statuses.append(urllib.request.urlopen(request, timeout=60).status)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)

        threads = [threading.Thread(target=join, args=(i,)) for i in range(60)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        running = pipeline.default_concurrency  # the batch's rows limit: 24
        assert running == pipeline.max_batch_rows == MAX_BATCH_ROWS
        assert statuses.count(200) <= 8 + running, "at most max_size waiting and the running ones"
        assert statuses.count(503) >= 60 - 8 - running and len(statuses) == 60
        deadline = time.monotonic() + 30
        while len(inside) < min(running, statuses.count(200)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert max(inside) == min(running, statuses.count(200)), "the accepted requests reach the model together"
    finally:
        release.set()
        blocks.close()


def test_info_line_tells_a_long_question_its_limit_and_beams_their_timing(client, media_files):
    question = "what is the man holding in the picture and why " * 3
    answer, info, *_ = client.predict(handle_file(str(media_files["image"])), question, api_name="/answer_image")
    assert "Long question" in info and "Max new tokens" in info
    assert "3-beam search" in info and "first token" not in info


# -- users' trained adapters: the Adapter field and the endpoints' `adapter` parameter ---------------------------


def own_media(folder: Path, modality: str) -> Path:
    """A file only `tiny_app` receives: the upload cache is shared by content, and an app that another
    test closes deletes the uploads it received."""
    if modality == "image":
        return write_image(folder / "own.png", seed=12)
    return write_wav(folder / "own.wav", seconds=0.5, freq=523.0)


def test_concurrent_app_requests_share_decode_steps_and_get_their_own_answers(tiny_app, client, tmp_path):
    """Three users at once through the app's API: their rows go through the LM in one step, and each gets
    the answer it gets alone."""
    import threading

    pipeline, _ = tiny_app
    settings = dict(preset="fast", max_new_tokens=6)
    images = [handle_file(str(write_image(tmp_path / f"u{i}.png", seed=40 + i))) for i in range(3)]
    alone = [client.predict(image, **settings, api_name="/caption_image")[0] for image in images]
    scheduler = pipeline.scheduler(pipeline.lm(pipeline.task("image-caption"))[0])
    held, rows = threading.Event(), []

    def step(count: int) -> None:  # the first step waits until the other two requests are queued
        rows.append(count)
        if len(rows) == 1:
            held.wait(30)

    scheduler.callback = step
    try:
        first = client.submit(images[0], **settings, api_name="/caption_image")
        deadline = time.monotonic() + 30
        while not rows and time.monotonic() < deadline:
            time.sleep(0.01)
        others = [client.submit(image, **settings, api_name="/caption_image") for image in images[1:]]
        while len(scheduler._waiting) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        held.set()
        answers = [job.result()[0] for job in [first, *others]]
    finally:
        held.set()
        scheduler.callback = None
    assert answers == alone
    assert max(rows) == 3, f"rows per step {rows}: the three requests shared steps"


def test_a_saved_adapter_answers_the_same_in_the_cli_the_python_api_and_the_app(
    tiny_app, client, fake_hub, tmp_path, capsys, monkeypatch
):
    pipeline, _ = tiny_app
    folder = saved_tiny_adapter(tmp_path / "colours", pipeline)
    for name in ("adapter.safetensors", "adapter_config.json"):
        fake_hub.add("someone/colours", name, (folder / name).read_bytes())
    image, settings = str(own_media(tmp_path, "image")), dict(preset="fast", max_new_tokens=4)
    argv = ["caption", "--tiny", "--device", "cpu", "--preset", "fast", "--max-new-tokens", "4", "--adapter"]
    assert cli([*argv, str(folder), image]) == 0  # its own pipeline, as another process would build
    from_cli = capsys.readouterr().out.strip().split("\t")[1]
    # a Python user's own pipeline (the app's reads only what its users uploaded)
    from_python = Pipeline(device="cpu", tiny=True).caption(image, adapter=str(folder), **settings).text
    registry_answer, *_ = client.predict(handle_file(image), **settings, api_name="/caption_image")
    loaded = pipeline.loaded()
    monkeypatch.setattr(pipeline, "allow_local_adapters", False)  # as served without --allow-local-adapters
    answer, info, *_ = client.predict(
        handle_file(image), adapter="someone/colours", **settings, api_name="/caption_image"
    )
    assert answer == from_cli == from_python != registry_answer
    assert info.startswith("`adapter:someone/colours` · ")
    [added] = pipeline.loaded()[len(loaded) :]
    assert "adapter:someone/colours" in added, "only the adapter was loaded: the LM and encoder are shared"
    assert "adapter:" not in demo_app.status(pipeline), "the status line shows no user's adapter to others"
    with pytest.raises(AppError, match="'/.*' is not a Hub repo id.*adapter folders on this machine are not accepted"):
        client.predict(handle_file(image), adapter=str(folder), **settings, api_name="/caption_image")
    monkeypatch.setattr(pipeline, "allow_local_adapters", True)
    assert client.predict(handle_file(image), adapter=f" {folder} ", **settings, api_name="/caption_image")[0] == answer


@pytest.mark.parametrize(
    "api_name, args, message",
    [
        (
            "/answer_image",
            ["why?"],
            "trained for image captioning, not image question answering: use it to caption images",
        ),
        ("/caption_audio", [], "trained for image captioning, not audio captioning: use it to caption images"),
    ],
)
def test_an_adapter_for_another_tab_or_mode_is_refused_saying_where_it_goes(
    tiny_app, client, tmp_path, api_name, args, message
):
    folder = saved_tiny_adapter(tmp_path / "colours", tiny_app[0])
    media = handle_file(str(own_media(tmp_path, api_name.split("_")[1])))
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(media, *args, adapter=str(folder), api_name=api_name)
    assert not tiny_app[0].is_adapter_served(str(folder)), "a refused adapter is not served"
    image = handle_file(str(own_media(tmp_path, "image")))
    assert client.predict(image, adapter=str(folder), preset="fast", api_name="/caption_image")[0]
    with pytest.raises(AppError, match=re.escape(message)):  # served now, and still refused in another mode
        client.predict(media, *args, adapter=str(folder), api_name=api_name)


def test_an_adapter_on_models_the_app_does_not_serve_is_refused(tiny_app, client, tmp_path):
    import json

    folder = saved_tiny_adapter(tmp_path / "big", tiny_app[0])
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lm"] = {"id": "facebook/opt-66b", "name": "OPT-66B"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AppError, match="trained on OPT-66B \\+ ViT-B/16, which this app does not serve"):
        client.predict(handle_file(str(own_media(tmp_path, "image"))), adapter=str(folder), api_name="/caption_image")
    assert not tiny_app[0].is_adapter_served(str(folder)), "a refused adapter is not served"


def test_identical_answers_never_rewrite_a_picture_being_sent(client, media_files, monkeypatch):
    """Gradio writes an array's PNG in place at a path named by its content, so two identical answers rewrote
    one file while the other was being sent ("Too little data for declared Content-Length"). The app hands
    it files of each response's own, which it copies once, atomically, and never writes again."""
    import concurrent.futures

    import gradio.processing_utils

    def forbidden(*args, **kwargs):
        raise AssertionError("an array was written in place")

    for name in ("save_img_array_to_cache", "save_pil_to_cache"):
        monkeypatch.setattr(gradio.processing_utils, name, forbidden)
    image = handle_file(str(media_files["image"]))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # two visitors, two sessions: one gradio_client shared by threads races on its session's event stream
        visitors = [client, Client(client.src, verbose=False)]
        jobs = [pool.submit(visitor.predict, image, preset="fast", api_name="/caption_image") for visitor in visitors]
        results = [job.result(timeout=120) for job in jobs]
    (first, *_), (second, *_) = (seen for _, _, seen, _, _ in results)
    assert Image.open(first["image"]).tobytes() == Image.open(second["image"]).tobytes()


def test_a_request_made_while_the_preload_downloads_shows_its_bytes_and_stages(real_hub, media_files):
    """A first visitor who clicks at once waits on the start-up preload: the info box (and the API's
    intermediate outputs) show that load's stages and download bytes, whoever started it."""
    import threading

    from epalm.tasks import load_registry

    weights = threading.Event()  # the LM's weights stop halfway until the request has joined the download
    real_hub.paused["/facebook/opt-2.7b/resolve/main/pytorch_model.bin"] = weights
    pipeline = Pipeline(device="cpu", registry=load_registry(real_hub.registry), pack_weights=False)
    pipeline.start_preload(["image-caption"])
    blocks, url = serve(pipeline)
    try:
        job = Client(url, verbose=False).submit(
            handle_file(str(media_files["image"])), preset="fast", max_new_tokens=2, api_name="/caption_image"
        )
        deadline = time.time() + 60
        while not any("pytorch_model.bin" in info for _, info, *_ in job.outputs()) and time.time() < deadline:
            time.sleep(0.05)
        weights.set()
        answer, final, *_ = job.result(timeout=300)
        shown = [info for _, info, *_ in job.outputs()]
        downloading = [info for info in shown if "Downloading pytorch_model.bin" in info]
        assert downloading and re.search(r"\d+(\.\d+)? [KMG]iB of \d+(\.\d+)? [KMG]iB \(\d+%\)", downloading[0])
        assert any(info.startswith("⏳ Loaded OPT-2.7B language model") for info in shown), "and its stages"
        assert shown.index(downloading[0]) < len(shown) - 1 and "tokens/s" in final
    finally:
        weights.set()
        blocks.close()

"""No server file leaves the server: every event that takes media reads only what its caller uploaded.

An attacker does not need the API page: the browser's own route (`/gradio_api/queue/join` with an
`fn_index`) reaches every event. Each media argument is sent as payloads naming files on the server,
shaped as Gradio marks its files and not (no `meta`, a wrong `meta._type`, `url: null`), and each must be
refused with the same words whatever is at the path (an image, a non-image, a folder, nothing, a link out
of the upload folder), with nothing of the file sent back.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gradio.utils import get_upload_folder
from PIL import Image

from epalm import MediaError, MediaLimits, Pipeline
from epalm.adapters import MAX_USERS_ADAPTERS
from epalm.media import NOT_UPLOADED, check_file

from conftest import write_image, write_video, write_wav
from test_app import serve

MEDIA_TYPES = {"image", "video", "audio"}


@pytest.fixture(scope="module")
def app():
    pipeline = Pipeline(device="cpu", tiny=True)
    blocks, url = serve(pipeline)
    yield blocks, url, pipeline
    blocks.close()


def queue_call(url: str, fn_index: int, data: list) -> dict:
    """Run one event as the browser does (join the queue, read its stream); the last message."""
    session = uuid.uuid4().hex
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "trigger_id": None, "event_data": None}
    request = urllib.request.Request(
        url + "gradio_api/queue/join", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    urllib.request.urlopen(request, timeout=30).read()
    last = {}
    with urllib.request.urlopen(url + f"gradio_api/queue/data?session_hash={session}", timeout=120) as stream:
        for line in stream:
            line = line.decode().strip()
            if line.startswith("data:"):
                last = json.loads(line[5:])
                if last.get("msg") == "process_completed":
                    return last
    return last


def media_events(blocks) -> list[tuple[int, list[str], int]]:
    """(fn_index, input component types, position of the media input) of every event with a server
    function that takes a media component: named endpoints and any other."""
    config = blocks.config
    types = {c["id"]: c["type"] for c in config["components"]}
    found = []
    for dependency in config["dependencies"]:
        kinds = [types[i] for i in dependency["inputs"]]
        if dependency["backend_fn"] and MEDIA_TYPES & set(kinds):
            found.append((dependency["id"], kinds, next(i for i, k in enumerate(kinds) if k in MEDIA_TYPES)))
    return found


def server_files(tmp: Path) -> dict[str, str]:
    """Paths on the server that no caller uploaded: what an attacker would like to read or probe."""
    outside = tmp / "private"
    outside.mkdir()
    photo = write_image(outside / "photo.png", size=(64, 64))
    (outside / "notes.txt").write_text("secret")
    link_dir = Path(get_upload_folder()) / f"link-{uuid.uuid4().hex}"
    link_dir.mkdir(parents=True)
    (link_dir / "photo.png").symlink_to(photo)  # inside the upload folder, pointing out of it
    return {
        "image": str(photo),
        "video": str(write_video(outside / "clip.mp4")),
        "audio": str(write_wav(outside / "sound.wav")),
        "non-image": str(outside / "notes.txt"),
        "folder": str(outside),
        "missing": str(outside / "nothing.jpg"),
        "link out": str(link_dir / "photo.png"),
        "system": "/etc/passwd",
    }


def payloads(kind: str, path: str) -> dict[str, object]:
    """The shapes of a media argument naming `path` that Gradio's own checks do not all catch."""
    file = {"path": path}
    shapes = {
        "bare": file,
        "mis-typed meta": {**file, "meta": {"_type": "anything"}},
        "url null": {**file, "url": None, "orig_name": "x.png"},
        "marked": {**file, "meta": {"_type": "gradio.FileData"}},
    }
    if kind == "video":  # the shape of Gradio 4's video payloads
        shapes.update({f"video {name}": {"video": shape, "subtitles": None} for name, shape in list(shapes.items())})
    return shapes


def defaults(blocks, dependency: dict) -> list:
    """The event's inputs as the page first shows them."""
    values = {c["id"]: c["props"].get("value") for c in blocks.config["components"]}
    return [values[i] for i in dependency["inputs"]]


def test_no_event_reads_a_file_its_caller_did_not_upload(app, tmp_path):
    blocks, url, pipeline = app
    events = media_events(blocks)
    assert len(events) == 5, "the five endpoints take media; nothing else does"
    targets = server_files(tmp_path)
    image_events = {fn_index for fn_index, kinds, position in events if kinds[position] == "image"}
    refusals: dict[str, set[str]] = {}
    for fn_index, kinds, position in events:
        dependency = next(d for d in blocks.config["dependencies"] if d["id"] == fn_index)
        data = defaults(blocks, dependency)
        if "textbox" in kinds[position + 1 : position + 2]:
            data[position + 1] = "what is it?"  # the question, where there is one
        for target, path in targets.items():
            for shape, payload in payloads(kinds[position], path).items():
                data[position] = payload
                result = queue_call(url, fn_index, data)
                assert result.get("msg") == "process_completed" and result["success"] is False, (target, shape)
                assert "output" not in result or "data" not in result["output"], "nothing of the file came back"
                message = result["output"]["error"]  # None: refused without words (Gradio's own check)
                refusals.setdefault((fn_index, shape), set()).add(message and message.replace(path, "PATH"))
    for (fn_index, shape), messages in refusals.items():  # one answer per payload, whatever is at the path:
        assert len(messages) == 1 and messages <= {NOT_UPLOADED, None}, (fn_index, shape, messages)  # None: Gradio's
    # own refusal (a payload its data model does not take), which says nothing; the image events take every shape
    assert {m for (f, _), ms in refusals.items() for m in ms if f in image_events} == {NOT_UPLOADED, None}


def test_an_uploaded_file_a_pasted_image_and_an_example_still_answer(app, media_files):
    blocks, url, pipeline = app
    dependency = next(d for d in blocks.config["dependencies"] if d["api_name"] == "caption_image")
    fn_index, kinds, position = next(e for e in media_events(blocks) if e[0] == dependency["id"])
    data = defaults(blocks, dependency)
    png = io.BytesIO()
    Image.open(media_files["image"]).save(png, format="PNG")
    data[position] = {
        "url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode(),
        "meta": {"_type": "gradio.FileData"},
    }
    pasted = queue_call(url, fn_index, data)
    assert pasted["success"] is True, pasted
    assert pasted["output"]["data"][0], "a pasted (data: URL) image is the caller's own"
    huge = io.BytesIO()  # 144 megapixels in a small PNG: refused from its header, as an upload is
    Image.new("L", (12000, 12000)).save(huge, format="PNG")
    data[position] = {"url": "data:image/png;base64," + base64.b64encode(huge.getvalue()).decode()}
    refused = queue_call(url, fn_index, data)
    assert refused["success"] is False, refused
    assert refused["output"]["error"] == "Image is 12000×12000 pixels; the limit is 100 megapixels."
    upload = Path(get_upload_folder()) / uuid.uuid4().hex / "cat.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(png.getvalue())
    data[position] = {"path": str(upload), "meta": {"_type": "gradio.FileData"}}
    uploaded = queue_call(url, fn_index, data)
    assert uploaded["success"] is True and uploaded["output"]["data"][0] == pasted["output"]["data"][0]


@pytest.mark.parametrize("kind", ["outside", "missing", "folder", "fifo", "link out", "nul"])
def test_the_library_refuses_paths_outside_its_folders_before_opening_them(tmp_path, kind):
    allowed, outside = tmp_path / "uploads", tmp_path / "elsewhere"
    allowed.mkdir(), outside.mkdir()
    photo = write_image(outside / "photo.png")
    paths = {
        "outside": photo,
        "missing": allowed / "nothing.png",
        "folder": allowed,
        "fifo": outside / "pipe.png",
        "link out": allowed / "photo.png",
        "nul": "uploads/\0photo.png",
    }
    if kind == "fifo":
        os.mkfifo(paths["fifo"])  # opening it would block: the check must not open it
    if kind == "link out":
        paths["link out"].symlink_to(photo)
    limits = MediaLimits(folders=(str(allowed),))
    with pytest.raises(MediaError) as refused:
        check_file(paths[kind], limits)
    assert str(refused.value) == NOT_UPLOADED
    pipeline = Pipeline(device="cpu", tiny=True, limits=limits)
    with pytest.raises(MediaError, match=NOT_UPLOADED):
        pipeline.caption(str(paths[kind]), task="image-caption")
    inside = write_image(allowed / "mine.png")
    assert check_file(inside, limits) == inside.resolve()
    assert pipeline.caption(str(inside), task="image-caption", preset="fast").done


def test_a_malformed_adapter_config_is_a_readable_refusal_in_the_app(app, fake_hub, tmp_path, media_files):
    """Every bad adapter config of the library's table, given by a visitor as a Hub id or (where allowed) a
    folder: a refusal naming the field, never an internal error; the app answers normally afterwards."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from test_adapters import MALFORMED, _set, saved_tiny_adapter

    blocks, url, pipeline = app
    client = Client(url, verbose=False)
    folder = saved_tiny_adapter(tmp_path / "good", Pipeline(device="cpu", tiny=True))
    good = json.loads((folder / "adapter_config.json").read_text())
    image = handle_file(str(media_files["image"]))
    for number, (field, value, message) in enumerate(MALFORMED):
        bad = tmp_path / f"bad{number}"
        bad.mkdir()
        (bad / "adapter.safetensors").write_bytes((folder / "adapter.safetensors").read_bytes())
        (bad / "adapter_config.json").write_text(json.dumps(_set(json.loads(json.dumps(good)), field, value)))
        fake_hub.add(f"someone/bad{number}", "adapter_config.json", (bad / "adapter_config.json").read_bytes())
        fake_hub.add(f"someone/bad{number}", "adapter.safetensors", (bad / "adapter.safetensors").read_bytes())
        for source in (str(bad), f"someone/bad{number}"):
            with pytest.raises(AppError) as refused:
                client.predict(image, adapter=source, preset="fast", api_name="/caption_image")
            shown = str(refused.value)
            assert message in shown and "Something went wrong" not in shown, (field, value, shown)
    assert client.predict(image, preset="fast", api_name="/caption_image")[0], "the app answers as before"


def test_hundreds_of_visitors_adapters_keep_the_server_flat(app, fake_hub, tmp_path, media_files):
    """Every visitor may name another Hub adapter: a bounded few stay loaded, memory stays flat."""
    from gradio_client import Client, handle_file

    from test_adapters import _publish, saved_tiny_adapter

    blocks, url, pipeline = app
    folder = saved_tiny_adapter(tmp_path / "mine", Pipeline(device="cpu", tiny=True))
    image = handle_file(str(media_files["image"]))
    for number in range(200):
        _publish(fake_hub, f"visitor/adapter-{number}", folder)

    visitor = threading.local()  # each visitor has a browser session of its own, like people do

    def visit(number: int) -> str:
        if not hasattr(visitor, "client"):
            visitor.client = Client(url, verbose=False)
        answer, *_ = visitor.client.predict(
            image, adapter=f"visitor/adapter-{number}", preset="fast", max_new_tokens=2, api_name="/caption_image"
        )
        return answer

    rss = []
    with ThreadPoolExecutor(4) as visitors:  # four at a time
        for first, last in ((0, 50), (50, 200)):
            assert all(isinstance(a, str) for a in visitors.map(visit, range(first, last)))
            rss.append(_rss_bytes())
    kept = [name for name in pipeline.loaded() if "adapter:" in name]
    assert len(kept) <= MAX_USERS_ADAPTERS and len(pipeline.users) <= MAX_USERS_ADAPTERS, "a bounded few kept"
    # the tiny adapters weigh ~25 KB each: the count above is what bounds; memory is checked for gross growth only
    assert rss[1] - rss[0] < 100 * 2**20, f"memory grew by {(rss[1] - rss[0]) / 2**20:.0f} MB over 150 adapters"


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


# (parameter, value sent as raw JSON, what the refusal says): each names the parameter, none is an internal error
RAW_VALUES = [
    ("max_new_tokens", float("nan"), "max_new_tokens must be a whole number from 1 to 512, not nan"),
    ("max_new_tokens", "abc", "max_new_tokens: 'abc' is not a value it takes"),
    ("max_new_tokens", 1e9, "max_new_tokens: Value 1000000000.0 is greater than maximum value 64"),
    ("frames", float("nan"), "frames to sample must be a whole number from 1 to 64, not nan"),
    ("frames", "abc", "frames: 'abc' is not a value it takes"),
    ("temperature", "hot", "temperature: 'hot' is not a value it takes"),
    ("task", ["video-caption"], "task must be text, not list"),
    ("preset", 5, "preset: Value: 5"),
    ("adapter", "\ud800", "is not a Hub repo id (user/name) nor a folder's path"),
    ("adapter", "x" * 10_000, "Adapter 'xxxxxxxx"),
]


def test_raw_json_values_get_a_readable_refusal_naming_the_parameter(app, media_files):
    import httpx

    blocks, url, _ = app
    dependency = next(d for d in blocks.config["dependencies"] if d["api_name"] == "caption_video")
    names = ["media", "task", "preset", "max_new_tokens", "temperature", "top_p", "frames", "adapter"]
    with open(media_files["video"], "rb") as upload:
        path = httpx.post(url + "gradio_api/upload", files={"files": upload}).json()[0]
    for name, value, message in RAW_VALUES:
        data = defaults(blocks, dependency)
        data[0], data[names.index(name)] = {"path": path, "meta": {"_type": "gradio.FileData"}}, value
        result = queue_call(url, dependency["id"], data)
        refusal = result["output"]["error"]
        assert result["success"] is False and message in refusal and len(refusal) < 300, (name, value, refusal)
    media = {"path": path, "meta": {"_type": "gradio.FileData"}}
    answered = queue_call(url, dependency["id"], [media, *defaults(blocks, dependency)[1:]])
    assert answered["success"] is True, "the server answers on"


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_new_tokens=float("nan")), "max_new_tokens must be a whole number from 1 to 512, not nan"),
        (dict(preset="sampling", temperature=float("nan")), "sampling needs temperature > 0"),
        (dict(num_frames=float("nan")), "frames to sample must be a whole number from 1 to 64, not nan"),
        (dict(task=["image-caption"]), "task must be text, not list"),
        (dict(question="what \ud800 is"), "The question holds characters that are not text"),
        (dict(num_beams=2000), "num_beams must be a whole number from 1 to 8, not 2000"),
        (dict(colour="red"), "unknown decoding setting 'colour'"),
    ],
)
def test_the_python_api_refuses_bad_values_naming_them(media_files, settings, message):
    from epalm import InputError

    pipe = Pipeline(device="cpu", tiny=True)
    task = settings.pop("task", "video-qa-msvd")
    question = settings.pop("question", "what is it?")
    with pytest.raises(InputError, match=re.escape(message)):
        pipe.answer(media_files["video"], question, task, **settings)
    assert pipe.loaded() == [], "refused before any model loads"


def test_the_cli_refuses_a_question_that_is_not_text(media_files, capsys):
    """`ask -q $'what \\xff is'`: the shell hands Python bytes that are not UTF-8 (a lone surrogate)."""
    from epalm.__main__ import main

    code = main(["ask", "--tiny", "--task", "image-vqa", "-q", "what \udcff is", str(media_files["image"])])
    out = capsys.readouterr().out
    assert code == 2 and "ERROR: The question holds characters that are not text" in out


def test_a_client_that_drops_its_connection_leaves_the_batch_at_the_next_step(media_files, monkeypatch):
    """A closed tab or a dropped connection ends the request: its rows leave at the next step, not at the end."""
    import httpx

    pipeline = Pipeline(device="cpu", tiny=True)
    lm = pipeline.lm(pipeline.task("image-caption"))[0]
    steps, step = [], lm.step
    monkeypatch.setattr(lm, "step", lambda state, tokens: (steps.append(time.monotonic()), step(state, tokens))[1])
    pipeline.scheduler(lm).callback = lambda rows: time.sleep(0.01)  # steps slow enough to drop in between
    blocks, url = serve(pipeline)
    try:
        dependency = next(d for d in blocks.config["dependencies"] if d["api_name"] == "caption_image")
        with open(media_files["image"], "rb") as upload:
            path = httpx.post(url + "gradio_api/upload", files={"files": upload}).json()[0]
        data = defaults(blocks, dependency)
        data[0], data[2], data[3] = {"path": path, "meta": {"_type": "gradio.FileData"}}, "fast", 64
        session = uuid.uuid4().hex
        body = {"data": data, "fn_index": dependency["id"], "session_hash": session, "trigger_id": None}
        join = urllib.request.Request(url + "gradio_api/queue/join", json.dumps(body).encode())
        join.add_header("Content-Type", "application/json")
        urllib.request.urlopen(join, timeout=30).read()
        stream = urllib.request.urlopen(url + f"gradio_api/queue/data?session_hash={session}", timeout=60)
        while len(steps) < 3:  # the answer is under way
            stream.readline()
        stream.close()
        dropped = time.monotonic()
        time.sleep(2)
        assert len([t for t in steps if t > dropped]) <= 2 and len(steps) < 30, f"{len(steps)} steps of 63"
    finally:
        blocks.close()

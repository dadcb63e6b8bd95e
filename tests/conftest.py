"""Shared fixtures: the reference parity cases and tiny random models (no network)."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from epalm.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EPALM_SHARED", ROOT.parent / "shared"))
PARITY_CASES = sorted(p for p in (SHARED / "parity").glob("*") if (p / "manifest.json").is_file())

# tiny models gain nothing from threads, and idle OpenMP workers spin against any other load
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses the tests start


@pytest.fixture(scope="session")
def parity_cases() -> list[Path]:
    assert PARITY_CASES, f"no parity fixtures under {SHARED / 'parity'} (set EPALM_SHARED)"
    return PARITY_CASES


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


class FakeHub:
    """A loopback server that answers like the Hub's resolve endpoint (HEAD + GET with the
    commit and ETag headers huggingface_hub reads), so the real `hf_hub_download` path runs."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.downloads: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, body: bool) -> None:
                path = self.path.split("?")[0]
                data = hub.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Error-Message", "Entry not found")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.COMMIT)
                self.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest())
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    hub.downloads.append(path)
                    self.wfile.write(data)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo_id: str, filename: str, data: bytes, repo_type: str = "model", revision: str = "main") -> None:
        prefix = {"model": "", "space": "spaces/", "dataset": "datasets/"}[repo_type]
        self.files[f"/{prefix}{repo_id}/resolve/{revision}/{filename}"] = data


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    """The fake Hub, with HF_ENDPOINT pointed at it and a private HF_HOME cache (for subprocesses
    through the environment, and for this process through huggingface_hub's constants)."""
    import huggingface_hub.constants as constants

    hub = FakeHub()
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield hub
    hub.server.shutdown()


def write_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """A small random RGB JPEG/PNG (by suffix)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_video(path: Path, frames: int = 12, size: tuple[int, int] = (64, 48), fps: int = 8, seed: int = 0) -> Path:
    """A short H.264 MP4 of random frames, written with PyAV."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, freq: float = 440.0) -> Path:
    """A mono 16-bit sine tone."""
    import wave

    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return path


@pytest.fixture(scope="session")
def media_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    return {
        "image": write_image(folder / "photo.jpg"),
        "video": write_video(folder / "clip.mp4"),
        "audio": write_wav(folder / "tone.wav"),
    }


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (235, 235, 235)}
PITCHES = {"red": 220.0, "green": 440.0, "blue": 880.0, "white": 1760.0}  # the audio task: a tone per "colour"


def write_colour_media(path: Path, colour: str, seed: int) -> Path:
    """By the file's suffix: a solid-colour image or clip (shade jittered by `seed`), or a 10-s tone
    (the model's window) of the colour's pitch: the synthetic tasks the training tests learn."""
    import av
    import numpy as np
    from PIL import Image

    if path.suffix == ".wav":
        return write_wav(path, seconds=10.0, freq=PITCHES[colour] * (1 + 0.02 * (seed % 5)))
    rng = np.random.default_rng(seed)
    rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-25, 26, 3), 0, 255).astype(np.uint8)
    frame = np.broadcast_to(rgb, (32, 32, 3)).copy()
    if path.suffix == ".png":
        Image.fromarray(frame).save(path)
        return path
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_colour_folder(root: Path, per_colour: int, suffix: str = ".png", qa: bool = False, seed: int = 0) -> Path:
    """An imagefolder-convention folder: files + metadata.jsonl, captions "a red" (one token per
    colour for the tiny tokenizer) or, with `qa`, "what colour is it?" -> "a red"."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, colour in enumerate(COLOURS):
        for i in range(per_colour):
            name = f"{colour}_{i}{suffix}"
            write_colour_media(root / name, colour, seed=seed + 100 * c + i)
            target = f"a {colour}"
            columns = {"question": "what colour is it", "answer": target} if qa else {"text": target}
            rows.append({"file_name": name, **columns})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root

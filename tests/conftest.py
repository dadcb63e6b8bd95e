"""Shared fixtures: the reference parity cases and tiny random models (no network)."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from epalm.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = ROOT / "tests" / "fixtures" / "parity"


def _parity_cases() -> list[Path]:
    """The in-repo cases, plus those named by EPALM_PARITY (case folders, or folders of cases,
    separated by the path separator)."""
    roots = [PARITY_DIR] + [Path(p) for p in os.environ.get("EPALM_PARITY", "").split(os.pathsep) if p]
    cases = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"EPALM_PARITY names {root}, which is not a folder")
        is_case = (root / "manifest.json").is_file()
        cases += [root] if is_case else sorted(m.parent for m in root.glob("*/manifest.json"))
    return cases


PARITY_CASES = _parity_cases()

# tiny models gain nothing from threads, and idle OpenMP workers spin against any other load
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses the tests start


CHROMIUM_HELP = (
    "install Chromium (Debian/Ubuntu: apt-get install chromium; elsewhere: python -m playwright install chromium), "
    "or name its executable in EPALM_CHROMIUM"
)


def chromium_executable(playwright) -> str:
    """The Chromium the browser tests drive: $EPALM_CHROMIUM, a `chromium` on the PATH (Debian's, as
    tests/setup.sh installs it) or the one Playwright downloads. Without any, the tests fail where
    apt-get could have installed it (CI), and are skipped, saying why, only where it could not."""
    named = os.environ.get("EPALM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if named:
        return named
    if Path(playwright.chromium.executable_path).is_file():
        return playwright.chromium.executable_path
    if shutil.which("apt-get"):
        pytest.fail(f"no Chromium for the browser tests: tests/setup.sh installs it with apt-get, or {CHROMIUM_HELP}")
    pytest.skip(f"no Chromium on this machine and no apt-get to install it: {CHROMIUM_HELP}")


@pytest.fixture(scope="session")
def parity_cases() -> list[Path]:
    assert PARITY_CASES, f"no parity fixtures under {PARITY_DIR}"
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
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
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

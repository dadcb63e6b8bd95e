"""Rebuild the example files in this folder (see README.md for what each one is).

    python examples/make_examples.py

Needs scikit-image (its bundled public-domain / CC0 photographs), PyAV, Pillow, numpy and the
`espeak-ng` program (Debian/Ubuntu: `apt-get install espeak-ng`). The pictures and sounds are
the same on every run; the H.264 encoder may vary a few bytes between runs.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image
from skimage import data

HERE = Path(__file__).resolve().parent
FPS = 12
log = logging.getLogger("make_examples")


def save_photos() -> dict[str, Image.Image]:
    photos = {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(), "astronaut": data.astronaut()}
    images = {name: Image.fromarray(pixels) for name, pixels in photos.items()}
    for name, image in images.items():
        image.save(HERE / "image" / f"{name}.jpg", quality=85, optimize=True)
    return images


def camera_move(
    image: Image.Image,
    path: Path,
    start: tuple[float, ...],
    end: tuple[float, ...],
    seconds: float,
    size: tuple[int, int],
) -> None:
    """A smooth (eased) move of a crop box from `start` to `end` (left, top, right, bottom), as H.264."""
    frames = int(seconds * FPS)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(
            "libx264", rate=Fraction(FPS), options={"crf": "27", "preset": "slow", "threads": "1"}
        )
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            t = i / (frames - 1)
            eased = 0.5 - 0.5 * np.cos(np.pi * t)
            box = tuple(float(a + (b - a) * eased) for a, b in zip(start, end))
            frame = image.resize(size, Image.Resampling.BICUBIC, box=box)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def save_videos(images: dict[str, Image.Image]) -> None:
    cat = images["cat"]  # 451×300: slow zoom from the whole picture to the face
    camera_move(cat, HERE / "video" / "cat_zoom.mp4", (0, 0, 450, 300), (75, 10, 375, 210), 4.0, (336, 224))
    coffee = images["coffee"]  # 600×400: pan left to right across the table
    camera_move(coffee, HERE / "video" / "coffee_pan.mp4", (0, 50, 375, 300), (225, 50, 600, 300), 4.0, (336, 224))


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def save_speech() -> None:
    """English speech from espeak-ng, stored as MP3."""
    text = "Hello there. A man is speaking while the dog barks in the distance."
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
        with av.open(str(raw)) as source, av.open(str(HERE / "audio" / "speech.mp3"), "w") as target:
            stream = target.add_stream("libmp3lame", rate=source.streams.audio[0].rate)
            stream.layout, stream.bit_rate = "mono", 48000
            for frame in source.decode(audio=0):
                frame.pts = None
                for packet in stream.encode(frame):
                    target.mux(packet)
            for packet in stream.encode(None):
                target.mux(packet)


def save_birdsong(rate: int = 16000, seconds: float = 5.0) -> None:
    """Synthetic bird chirps (fast rising-then-falling whistles in bursts) over a soft breeze."""
    rng = np.random.default_rng(7)
    n = int(rate * seconds)
    breeze = np.convolve(rng.normal(0, 1, n), np.ones(64) / 64, mode="same")
    out = 0.02 * breeze / np.abs(breeze).max()
    start = 0.2
    while start < seconds - 0.5:
        for _ in range(rng.integers(3, 6)):  # a burst of chirps
            length = rng.uniform(0.06, 0.12)
            t = np.arange(int(length * rate)) / rate
            base = rng.uniform(2500, 3500)
            sweep = base + 1500 * np.sin(np.pi * t / length)  # up then down
            phase = 2 * np.pi * np.cumsum(sweep) / rate
            envelope = np.sin(np.pi * t / length) ** 2
            chirp = envelope * (np.sin(phase) + 0.3 * np.sin(2 * phase))
            i = int(start * rate)
            out[i : i + len(chirp)] += 0.25 * chirp[: n - i]
            start += length + rng.uniform(0.03, 0.08)
        start += rng.uniform(0.4, 0.9)
    write_wav(HERE / "audio" / "birdsong.wav", out, rate)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for folder in ("image", "video", "audio"):
        (HERE / folder).mkdir(exist_ok=True)
    images = save_photos()
    save_videos(images)
    save_speech()
    save_birdsong()
    for path in sorted(HERE.glob("*/*")):
        log.info("%-28s %6.1f KB", path.relative_to(HERE), path.stat().st_size / 1024)


if __name__ == "__main__":
    main()

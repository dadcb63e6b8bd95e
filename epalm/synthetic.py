"""Synthetic training tasks the tiny models can learn: smoke data for `python -m epalm train --tiny`,
the tests and bench/train.py. Each file is one of four "colours": a solid-colour image or clip
(its shade jittered), or a 10-second tone (the audio model's window) of the colour's pitch; its
caption is "a red" (one token per colour for the tiny tokenizer), or, as QA, "what colour is it"
-> "a red". Light to import: the writers import their libraries when called.
"""

from __future__ import annotations

import json
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (235, 235, 235)}
PITCHES = {"red": 220.0, "green": 440.0, "blue": 880.0, "white": 1760.0}  # the audio task: a tone per colour
QUESTION = "what colour is it"
SUFFIXES = {"image": ".png", "audio": ".wav", "video": ".mp4"}


def write_colour_media(path: Path, colour: str, seed: int) -> Path:
    """The file of `colour`, of the kind its suffix names (.png, .wav or .mp4)."""
    import av
    import numpy as np
    from PIL import Image

    if path.suffix == ".wav":
        return write_tone(path, PITCHES[colour] * (1 + 0.02 * (seed % 5)))
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


def write_tone(path: Path, freq: float, seconds: float = 10.0, rate: int = 16000) -> Path:
    """A mono 16-bit sine tone (10 s: the audio model's window)."""
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


def write_colour_folder(root: Path, per_colour: int, suffix: str = ".png", qa: bool = False, seed: int = 0) -> Path:
    """An imagefolder-convention folder of `per_colour` files per colour and its metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, colour in enumerate(COLOURS):
        for i in range(per_colour):
            name = f"{colour}_{i}{suffix}"
            write_colour_media(root / name, colour, seed=seed + 100 * c + i)
            target = f"a {colour}"
            rows.append({"file_name": name, **({"question": QUESTION, "answer": target} if qa else {"text": target})})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root

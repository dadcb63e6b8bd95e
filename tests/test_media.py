"""The media layer: the original preprocessing numerics, a corpus of awkward and hostile inputs
(each decodes or raises MediaError with a clear message), and determinism. Every file is written
here, offline, with Pillow / PyAV / the wave module."""

from __future__ import annotations

import importlib.util
import io
import struct
import sys
import threading
import time
import wave
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
import torchaudio
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from epalm import video as video_module
from epalm.audio import AudioTransform, audio_fbank, load_audio, prepare_audio, window_seconds
from epalm.image import CLIP_MEAN, CLIP_STD, ImageTransform, load_image, prepare_image
from epalm.media import DecodingBudget, MediaError, MediaLimits, decoding_budget
from epalm.video import (
    VideoTransform,
    frame_indices,
    load_video_frames,
    prepare_video,
    sample_frames,
    sample_video,
    video_tensor,
)

from conftest import ROOT

# -- writers -----------------------------------------------------------------------------------


def noise_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_video(
    path: Path,
    frames: int = 12,
    size: tuple[int, int] = (64, 48),
    fps: int = 8,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    rotation: float | None = None,
    audio: bool = False,
    gop: int = 12,
    container_options: dict | None = None,
    seed: int = 0,
) -> Path:
    """Frames whose red channel encodes their index (7·i mod 256) plus a green marker top-left."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", options=container_options or {}) as container:
        options = {"g": str(gop), "threads": "1"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        sound = _audio_stream(container, "aac", 44100, 2) if audio else None  # every stream before the first packet
        for i in range(frames):
            pixels = rng.integers(0, 40, (size[1], size[0], 3), dtype=np.uint8)
            pixels[:, :, 0] = (7 * i) % 256
            pixels[: size[1] // 4, : size[0] // 4, 1] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
        if sound is not None:
            _encode_audio(container, sound, tone(frames / fps, 44100, 2), 44100)
    return path


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """[channels, n] float32: a sine on channel 0, quieter different tones on the others."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.stack([0.3 / (c + 1) * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]).astype(
        np.float32
    )


def _audio_stream(container: Any, codec: str, rate: int, channels: int, sample_fmt: str | None = None) -> Any:
    stream = container.add_stream(codec, rate=rate)
    stream.layout = "mono" if channels == 1 else "stereo"
    if sample_fmt:
        stream.format = sample_fmt
    return stream


def _encode_audio(container: Any, stream: Any, samples: np.ndarray, rate: int) -> None:
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    step = stream.codec_context.frame_size or 1024
    for start in range(0, samples.shape[1], step):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples[:, start : start + step]), format="fltp", layout=layout
        )
        frame.sample_rate, frame.pts = rate, start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_audio(
    path: Path, codec: str, seconds: float = 1.0, rate: int = 44100, channels: int = 2, sample_fmt: str | None = None
) -> Path:
    with av.open(str(path), "w") as container:
        _encode_audio(
            container, _audio_stream(container, codec, rate, channels, sample_fmt), tone(seconds, rate, channels), rate
        )
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000, width: int = 2) -> Path:
    """Integer PCM WAV of [n] or [n, channels] samples already in the target integer range."""
    samples = samples.reshape(-1, 1) if samples.ndim == 1 else samples
    if width == 1:
        data = samples.astype(np.uint8).tobytes()
    elif width == 3:
        as32 = samples.astype("<i4").reshape(-1)
        data = b"".join(v.to_bytes(4, "little", signed=True)[:3] for v in as32.tolist())
    else:
        data = samples.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as out:
        out.setnchannels(samples.shape[1])
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(data)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand: a header claiming any size, and the given (filtered) rows."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def save(image: Image.Image, path: Path, **kwargs: Any) -> Path:
    image.save(path, **kwargs)
    return path


def jpeg_with_orientation(path: Path, orientation: int) -> Path:
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:10, :10] = (0, 255, 0)  # marker top-left, as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(Image.fromarray(pixels), path, exif=exif, quality=95)


def rotated_copy(src: Path, dst: Path, rotation: float) -> Path:
    """The same video packets (no re-encoding) in a file whose header says "rotate"."""
    with av.open(str(src)) as source, av.open(str(dst), "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        stream.set_display_rotation(rotation)
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    return dst


def truncated(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# -- preprocessing numerics ---------------------------------------------------------------------


def test_image_tensor_is_the_original_test_transform(tmp_path):
    pixels = noise_image(300, 170)
    path = save(Image.fromarray(pixels), tmp_path / "photo.png")
    original = transforms.Compose(
        [
            transforms.Resize((224, 224), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    expected = original(Image.fromarray(pixels))
    got = prepare_image(path)
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert torch.equal(prepare_image(pixels), expected) and torch.equal(prepare_image(path.read_bytes()), expected)
    small = prepare_image(path, ImageTransform(size=32))
    assert small.shape == (3, 32, 32)


@pytest.mark.parametrize(
    "vlen, num_frames, expected",
    [
        (12, 8, [0, 1, 3, 4, 6, 7, 9, 10]),
        (8, 8, [0, 1, 2, 3, 4, 5, 6, 7]),
        (5, 8, [0, 1, 2, 3, 4, 4, 4, 4]),
        (1, 16, [0] * 16),
        (300, 4, [37, 112, 187, 262]),
        (100, 3, [16, 49, 82]),
    ],
)
def test_frame_indices_are_the_middles_of_the_original_segments(vlen, num_frames, expected):
    assert frame_indices(num_frames, vlen) == expected
    bounds = np.linspace(0, vlen, min(num_frames, vlen) + 1).astype(int)  # the original's segments
    for index, start, end in zip(expected, bounds[:-1], bounds[1:]):
        assert start <= index <= max(start, end - 1)


def test_video_tensor_is_the_original_non_antialiased_uint8_resize():
    frames = torch.from_numpy(np.stack([noise_image(97, 61, seed) for seed in range(3)]))
    got = video_tensor(frames, VideoTransform(size=224))
    assert got.shape == (3, 3, 224, 224) and got.dtype == torch.float32  # [T, C, H, W] for TimesformerModel
    x = frames.permute(0, 3, 1, 2).float()  # what torchvision <= 0.14 did for uint8 tensors:
    resized = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    resized = resized.clamp(0, 255).round().to(torch.uint8)  # no antialias, rounded back to uint8
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    expected = (resized.float() / 255.0 - mean) / std
    assert torch.allclose(got, expected, atol=1e-6)
    shrunk = video_tensor(frames, VideoTransform(size=32))  # downscaling: antialiasing would change it
    antialiased = transforms.functional.resize(
        frames.permute(0, 3, 1, 2), [32, 32], InterpolationMode.BICUBIC, antialias=True
    )
    assert not torch.allclose(shrunk, (antialiased.float() / 255.0 - mean) / std, atol=1e-3)


def test_video_frames_are_the_sampled_ones_in_order(tmp_path):
    path = write_video(tmp_path / "count.mp4", frames=40, fps=10)
    frames = load_video_frames(path, num_frames=8)
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    red = frames[:, 20:, 20:, 0].astype(float).mean(axis=(1, 2))
    expected = [(7 * i) % 256 for i in frame_indices(8, 40)]
    assert np.abs(red - expected).max() < 4
    clip = prepare_video(path, VideoTransform(num_frames=16))
    assert clip.shape == (16, 3, 224, 224)


def test_pyav_fallback_gives_decords_frames(tmp_path):
    """A rotated file goes through PyAV (decord breaks on rotation), with seeks; turned back it
    must equal the unrotated file read by decord."""
    plain = write_video(tmp_path / "plain.mp4", frames=300, fps=10, gop=25)
    upside_down = rotated_copy(plain, tmp_path / "upside_down.mp4", 180)
    for num_frames in (16, 5):
        by_decord = load_video_frames(plain, num_frames)
        by_pyav = load_video_frames(upside_down, num_frames)
        assert np.array_equal(np.rot90(by_pyav, 2, axes=(1, 2)), by_decord)


def test_video_layer_works_without_decord(tmp_path, monkeypatch):
    """decord has no wheels for Apple Silicon or aarch64 Linux. With it missing, epalm/video.py
    still imports (run here as a second copy of the module) and PyAV gives the frames and the clip
    tensor that decord gives."""
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    spec = importlib.util.spec_from_file_location("epalm.video_without_decord", ROOT / "epalm" / "video.py")
    video = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, video)
    spec.loader.exec_module(video)
    assert video.decord is None
    path = write_video(tmp_path / "clip.mp4", frames=40, fps=10)
    assert np.array_equal(video.load_video_frames(path, 8), load_video_frames(path, 8))
    assert torch.equal(video.prepare_video(path), prepare_video(path))


@pytest.mark.parametrize(
    "rotation, shape, marker",
    [(-90, (64, 48), "top-right"), (90, (64, 48), "bottom-left"), (180, (48, 64), "bottom-right")],
)
def test_rotated_video_is_turned_upright(tmp_path, rotation, shape, marker):
    frames = load_video_frames(write_video(tmp_path / "phone.mp4", rotation=rotation), 4)
    assert frames.shape[1:3] == shape
    green = frames[0, :, :, 1] > 128
    rows, cols = np.nonzero(green)
    vertical = "top" if rows.mean() < shape[0] / 2 else "bottom"
    horizontal = "left" if cols.mean() < shape[1] / 2 else "right"
    assert f"{vertical}-{horizontal}" == marker


def kaldi_fbank(wave: torch.Tensor) -> torch.Tensor:
    """The original's call (AudioCaps loader): 128 HTK-style mel bins, Hanning, 10 ms shift, no dither."""
    return torchaudio.compliance.kaldi.fbank(
        wave[None],
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )


def test_fbank_is_the_originals_kaldi_call():
    wave16k = torch.from_numpy(tone(3.0, 16000)[0]) + 0.05
    got = audio_fbank(wave16k)
    assert got.shape == (1024, 128) and got.dtype == torch.float32
    centred = wave16k - wave16k.mean()
    fbank = kaldi_fbank(centred)
    frames = fbank.shape[0]
    assert frames == 1 + (len(wave16k) - 400) // 160  # 25 ms windows every 10 ms, snip_edges
    expected = (fbank - (-4.2677393)) / (4.5689974 * 2)
    assert torch.allclose(got[:frames], expected, atol=1e-5)
    padding = (0.0 + 4.2677393) / (4.5689974 * 2)  # zeros appended to the fbank, then normalised
    assert abs(padding - 0.467) < 1e-3
    assert torch.allclose(got[frames:], torch.full((1024 - frames, 128), padding))
    uncentred = kaldi_fbank(wave16k)
    assert torch.allclose(uncentred, fbank, atol=1e-3)  # the mean subtraction changes nothing (per-frame DC removal)


def test_long_audio_is_cropped_to_the_model_window(tmp_path):
    noise = np.random.default_rng(1).normal(0, 3000, 16000 * 20).clip(-32768, 32767).astype(np.int16)
    path = write_wav(tmp_path / "long.wav", noise)
    whole = audio_fbank(torch.from_numpy(noise.astype(np.float32) / 32768))  # fbank of all 20 s, then crop
    got = prepare_audio(path)
    assert got.shape == (1024, 128)
    assert torch.allclose(got, whole, atol=1e-4)
    assert window_seconds() == pytest.approx(10.255)
    assert len(load_audio(path, max_seconds=2.0)) == 32000


def test_first_channel_resampled_to_16k(tmp_path):
    rate = 44100
    samples = (tone(2.0, rate, channels=2).T * 32767).astype(np.int16)  # [n, 2]
    stereo = write_wav(tmp_path / "stereo.wav", samples, rate=rate)
    first = torch.from_numpy(samples[:, 0].astype(np.float32) / 32768)
    expected = audio_fbank(torchaudio.functional.resample(first, rate, 16000))
    assert torch.allclose(prepare_audio(stereo), expected, atol=1e-4)
    only_second = audio_fbank(
        torchaudio.functional.resample(torch.from_numpy(samples[:, 1].astype(np.float32) / 32768), rate, 16000)
    )
    assert not torch.allclose(prepare_audio(stereo), only_second, atol=1e-2)
    assert torch.allclose(prepare_audio((rate, samples)), expected, atol=1e-4)  # Gradio's microphone format


@pytest.mark.parametrize("width", [1, 2, 3])
def test_wav_samples_are_scaled_as_torchaudio_load(tmp_path, width):
    bits = 8 * width
    ints = (tone(0.2, 8000)[0] * (2 ** (bits - 1) - 1)).astype(np.int64)
    path = write_wav(tmp_path / f"pcm{bits}.wav", ints + (128 if width == 1 else 0), rate=8000, width=width)
    got = load_audio(path, sample_rate=8000)
    assert torch.allclose(got, torch.from_numpy(ints / 2.0 ** (bits - 1)).float(), atol=1e-7)


def test_image_orientation_depth_and_transparency(tmp_path):
    upright = load_image(
        jpeg_with_orientation(tmp_path / "exif6.jpg", 6)
    )  # stored landscape, shown rotated 90° clockwise
    assert upright.size == (40, 60)
    green = np.asarray(upright)[:, :, 1] > 128
    assert green[:10, -10:].mean() > 0.8  # the stored top-left is now top-right
    grey16 = Image.fromarray(np.full((4, 4), 32896, np.uint16))  # mid-grey in 16 bits
    assert np.asarray(load_image(save(grey16, tmp_path / "grey16.png")))[0, 0].tolist() == [128, 128, 128]
    rows = b"".join(b"\x00" + struct.pack(">HHH", 65535, 32896, 0) * 3 for _ in range(2))
    rgb48 = load_image(png_bytes(3, 2, 16, 2, rows))
    assert np.asarray(rgb48)[0, 0].tolist() == [255, 128, 0]
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(load_image(save(clear, tmp_path / "clear.png")))[0, 0].tolist() == [255, 255, 255]


def test_same_file_same_tensor(tmp_path):
    image = save(Image.fromarray(noise_image(80, 60)), tmp_path / "a.jpg")
    video = write_video(tmp_path / "v.mp4", frames=30)
    rotated = write_video(tmp_path / "r.mp4", frames=30, rotation=90)
    sound = write_audio(tmp_path / "s.mp3", "libmp3lame")
    for prepare, src in (
        (prepare_image, image),
        (prepare_video, video),
        (prepare_video, rotated),
        (prepare_audio, sound),
    ):
        assert torch.equal(prepare(src), prepare(src))


def test_long_files_cost_what_short_ones_do(tmp_path):
    """A 10-minute WAV and a 10-minute video (plain, and rotated so PyAV seeks) decode only what
    the model needs. No timing assertion: the test itself stays fast because of it."""
    minutes = write_wav(tmp_path / "ten_minutes.wav", np.zeros(16000 * 600, np.int16))
    assert prepare_audio(minutes).shape == (1024, 128)
    for rotation in (None, 90):
        path = write_video(
            tmp_path / f"long{rotation}.mp4", frames=3000, fps=5, size=(32, 32), gop=50, rotation=rotation
        )
        assert prepare_video(path, VideoTransform(num_frames=16)).shape == (16, 3, 224, 224)


# -- the corpus: awkward and hostile inputs -----------------------------------------------------

Builder = Callable[[Path], Any]
IMAGE, VIDEO, AUDIO = (3, 224, 224), (8, 3, 224, 224), (1024, 128)


def _cmyk(p: Path) -> Path:
    return save(Image.new("CMYK", (50, 40), (0, 128, 255, 20)), p / "cmyk.jpg")


def _palette_transparent(p: Path) -> Path:
    image = Image.new("P", (30, 20), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return save(image, p / "palette.png", transparency=0)


def _animated_gif(p: Path) -> Path:
    frames = [Image.new("RGB", (40, 30), (80 * i, 0, 0)) for i in range(3)]
    return save(frames[0], p / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _animated_webp(p: Path) -> Path:
    frames = [Image.new("RGB", (40, 30), (0, 80 * i, 0)) for i in range(3)]
    return save(frames[0], p / "anim.webp", save_all=True, append_images=frames[1:], duration=100)


def _file(name: str, data: bytes) -> Builder:
    def build(p: Path) -> Path:
        (p / name).write_bytes(data)
        return p / name

    return build


def _playlist(p: Path) -> Path:
    segment = write_video(p / "segment.mp4")
    (p / "list.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.5,\nfile://{segment}\n#EXT-X-ENDLIST\n")
    return p / "list.m3u8"


def _mp3(p: Path) -> Path:
    return write_audio(p / "a.mp3", "libmp3lame")


CORPUS: list[tuple[str, str, Builder, Any, MediaLimits]] = [
    # images
    ("exif-rotated jpeg", "image", lambda p: jpeg_with_orientation(p / "r.jpg", 8), IMAGE, MediaLimits()),
    ("cmyk jpeg", "image", _cmyk, IMAGE, MediaLimits()),
    (
        "16-bit grey png",
        "image",
        lambda p: save(Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100), p / "g16.png"),
        IMAGE,
        MediaLimits(),
    ),
    (
        "48-bit rgb png",
        "image",
        lambda p: png_bytes(2, 1, 16, 2, b"\x00" + b"\xff\xff\x00\x00\x80\x00" * 2),
        IMAGE,
        MediaLimits(),
    ),
    ("palette png with transparency", "image", _palette_transparent, IMAGE, MediaLimits()),
    (
        "grey + alpha png",
        "image",
        lambda p: save(Image.new("LA", (10, 10), (128, 100)), p / "la.png"),
        IMAGE,
        MediaLimits(),
    ),
    ("animated gif", "image", _animated_gif, IMAGE, MediaLimits()),
    ("animated webp", "image", _animated_webp, IMAGE, MediaLimits()),
    ("1x1 image", "image", lambda p: save(Image.new("RGB", (1, 1), (9, 9, 9)), p / "dot.png"), IMAGE, MediaLimits()),
    ("1-bit tiff", "image", lambda p: save(Image.new("1", (33, 7), 1), p / "bits.tif"), IMAGE, MediaLimits()),
    (
        "float tiff",
        "image",
        lambda p: save(Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)), p / "f.tif"),
        IMAGE,
        MediaLimits(),
    ),
    (
        "png header claiming 100000x100000",
        "image",
        lambda p: png_bytes(100000, 100000, 8, 2, b"\x00" * 64),
        "megapixels; the limit is 100 megapixels",
        MediaLimits(),
    ),
    (
        "2000x2000 over a 1 MP limit",
        "image",
        lambda p: png_bytes(2000, 2000, 8, 2, b"\x00" * 64),
        "Image is 2000×2000 pixels; the limit is 1 megapixels",
        MediaLimits(max_pixels=1_000_000),
    ),
    (
        "truncated jpeg",
        "image",
        lambda p: truncated(save(Image.fromarray(noise_image(200, 200)), p / "t.jpg")),
        "truncated or damaged",
        MediaLimits(),
    ),
    ("empty file", "image", _file("empty.jpg", b""), "The file is empty", MediaLimits()),
    (
        "text named .jpg",
        "image",
        _file("notes.jpg", b"not a picture at all"),
        "Could not read this file as an image",
        MediaLimits(),
    ),
    ("missing file", "image", lambda p: p / "nowhere.jpg", "File not found", MediaLimits()),
    ("a folder", "image", lambda p: p, "folder", MediaLimits()),
    (
        "over the file-size limit",
        "image",
        lambda p: save(Image.fromarray(noise_image(64, 64)), p / "big.png"),
        "the limit is",
        MediaLimits(max_file_bytes=1000),
    ),
    (
        "jpeg bytes",
        "image",
        lambda p: save(Image.fromarray(noise_image(20, 20)), p / "b.jpg").read_bytes(),
        IMAGE,
        MediaLimits(),
    ),
    (
        "file object",
        "image",
        lambda p: io.BytesIO(save(Image.fromarray(noise_image(20, 20)), p / "f.png").read_bytes()),
        IMAGE,
        MediaLimits(),
    ),
    ("grey uint8 array", "image", lambda p: np.zeros((5, 7), np.uint8), IMAGE, MediaLimits()),
    ("rgba float array", "image", lambda p: np.random.default_rng(0).random((9, 5, 4)), IMAGE, MediaLimits()),
    ("uint16 rgb array", "image", lambda p: np.full((9, 5, 3), 60000, np.uint16), IMAGE, MediaLimits()),
    ("NaN float array", "image", lambda p: np.full((4, 4, 3), np.nan, np.float32), "NaN", MediaLimits()),
    ("4-d array", "image", lambda p: np.zeros((2, 3, 4, 5), np.uint8), "Expected an image array", MediaLimits()),
    ("empty array", "image", lambda p: np.zeros((0, 5, 3), np.uint8), "no pixels", MediaLimits()),
    (
        "16-bit PIL image object",
        "image",
        lambda p: Image.fromarray(np.full((6, 6), 1000, np.uint16)),
        IMAGE,
        MediaLimits(),
    ),
    # video
    ("portrait 360x640", "video", lambda p: write_video(p / "portrait.mp4", size=(360, 640)), VIDEO, MediaLimits()),
    (
        "odd 97x61 yuv444p",
        "video",
        lambda p: write_video(p / "odd.mp4", size=(97, 61), pix_fmt="yuv444p"),
        VIDEO,
        MediaLimits(),
    ),
    (
        "odd 97x61 vp9 webm",
        "video",
        lambda p: write_video(p / "odd.webm", size=(97, 61), codec="libvpx-vp9"),
        VIDEO,
        MediaLimits(),
    ),
    ("rotated phone video", "video", lambda p: write_video(p / "rot.mp4", rotation=-90), VIDEO, MediaLimits()),
    ("one frame", "video", lambda p: write_video(p / "one.mp4", frames=1), VIDEO, MediaLimits()),
    ("3 frames for 8 samples", "video", lambda p: write_video(p / "three.mp4", frames=3), VIDEO, MediaLimits()),
    ("mkv without frame count", "video", lambda p: write_video(p / "v.mkv", frames=20), VIDEO, MediaLimits()),
    ("mpeg4 avi", "video", lambda p: write_video(p / "v.avi", codec="mpeg4"), VIDEO, MediaLimits()),
    ("animated gif as video", "video", _animated_gif, VIDEO, MediaLimits()),
    (
        "still png as video",
        "video",
        lambda p: save(Image.fromarray(noise_image(30, 20)), p / "still.png"),
        "This file is a still image (png), not a video: use an image task for it.",
        MediaLimits(),
    ),
    (
        "still jpeg as video",
        "video",
        lambda p: save(Image.fromarray(noise_image(30, 20)), p / "s.jpg"),
        "still image (mjpeg)",
        MediaLimits(),
    ),
    (
        "still gif as video",
        "video",
        lambda p: save(Image.new("RGB", (9, 9)), p / "s.gif"),
        "still image (gif)",
        MediaLimits(),
    ),
    (
        "webp bytes as video",
        "video",
        lambda p: save(Image.new("RGB", (9, 9)), p / "s.webp").read_bytes(),
        "still image (webp)",
        MediaLimits(),
    ),
    ("video with sound", "video", lambda p: write_video(p / "av.mp4", frames=16, audio=True), VIDEO, MediaLimits()),
    ("video bytes", "video", lambda p: write_video(p / "b.mp4").read_bytes(), VIDEO, MediaLimits()),
    (
        "truncated mp4 (index at the end)",
        "video",
        lambda p: truncated(write_video(p / "t.mp4", frames=40)),
        "Could not read this file as a video",
        MediaLimits(),
    ),
    (
        "truncated faststart mp4",
        "video",
        lambda p: truncated(write_video(p / "fs.mp4", frames=40, container_options={"movflags": "faststart"})),
        VIDEO,
        MediaLimits(),
    ),
    ("audio only given as video", "video", _mp3, "no video track (it contains only audio)", MediaLimits()),
    (
        "text named .mp4",
        "video",
        _file("notes.mp4", b"hello, I am not a video"),
        "Could not read this file as a video",
        MediaLimits(),
    ),
    ("empty mp4", "video", _file("empty.mp4", b""), "The file is empty", MediaLimits()),
    (
        "HLS playlist naming a local file",
        "video",
        _playlist,
        "Playlists (HLS, DASH, concat lists) are not accepted",
        MediaLimits(),
    ),
    (
        "longer than the limit",
        "video",
        lambda p: write_video(p / "long.mp4", frames=40, fps=8),
        "This video is 5.0 seconds long; the limit is 2.0 seconds",
        MediaLimits(max_clip_seconds=2),
    ),
    (
        "frames over the pixel limit",
        "video",
        lambda p: write_video(p / "wide.mp4"),
        "megapixels per frame",
        MediaLimits(max_frame_pixels=1000),
    ),
    # audio
    (
        "8-bit wav",
        "audio",
        lambda p: write_wav(p / "u8.wav", np.full(8000, 128, np.uint8) + 20, width=1),
        AUDIO,
        MediaLimits(),
    ),
    ("24-bit wav", "audio", lambda p: write_wav(p / "s24.wav", np.arange(8000) * 500, width=3), AUDIO, MediaLimits()),
    (
        "stereo 44.1 kHz wav",
        "audio",
        lambda p: write_audio(p / "st.wav", "pcm_s16le", sample_fmt="s16"),
        AUDIO,
        MediaLimits(),
    ),
    ("mp3", "audio", _mp3, AUDIO, MediaLimits()),
    ("flac", "audio", lambda p: write_audio(p / "a.flac", "flac", sample_fmt="s16"), AUDIO, MediaLimits()),
    (
        "ogg opus",
        "audio",
        lambda p: write_audio(p / "a.ogg", "libopus", rate=48000, sample_fmt="flt"),
        AUDIO,
        MediaLimits(),
    ),
    ("m4a aac", "audio", lambda p: write_audio(p / "a.m4a", "aac"), AUDIO, MediaLimits()),
    (
        "audio track of a video",
        "audio",
        lambda p: write_video(p / "av.mp4", frames=16, audio=True),
        AUDIO,
        MediaLimits(),
    ),
    (
        "video without audio",
        "audio",
        lambda p: write_video(p / "mute.mp4"),
        "no audio track (it contains only video)",
        MediaLimits(),
    ),
    (
        "an image given as audio",
        "audio",
        lambda p: Image.new("RGB", (8, 8)).save(p / "photo.png") or p / "photo.png",
        "This file has no audio track (it is an image).",
        MediaLimits(),
    ),
    ("silence", "audio", lambda p: write_wav(p / "silence.wav", np.zeros(16000, np.int16)), AUDIO, MediaLimits()),
    (
        "0.1 s clip",
        "audio",
        lambda p: write_wav(p / "short.wav", (tone(0.1, 16000)[0] * 20000).astype(np.int16)),
        AUDIO,
        MediaLimits(),
    ),
    (
        "10 ms clip (under one window)",
        "audio",
        lambda p: write_wav(p / "tiny.wav", np.full(160, 1000, np.int16)),
        AUDIO,
        MediaLimits(),
    ),
    ("empty wav", "audio", lambda p: write_wav(p / "empty.wav", np.zeros(0, np.int16)), "empty", MediaLimits()),
    (
        "corrupt wav header",
        "audio",
        _file("bad.wav", b"RIFF\x10\x00\x00\x00WAVEfmt " + bytes(range(40))),
        "Could not",
        MediaLimits(),
    ),
    ("text named .wav", "audio", _file("notes.wav", b"la la la"), "Could not read this file as audio", MediaLimits()),
    ("truncated mp3", "audio", lambda p: truncated(_mp3(p)), AUDIO, MediaLimits()),
    (
        "unusual 44101 Hz rate",
        "audio",
        lambda p: write_wav(p / "odd.wav", np.zeros(4410, np.int16), rate=44101),
        "unusual",
        MediaLimits(),
    ),
    (
        "longer than the limit",
        "audio",
        lambda p: write_wav(p / "long.wav", np.zeros(16000 * 90, np.int16)),
        "This recording is 90 seconds long; the limit is 60 seconds",
        MediaLimits(max_clip_seconds=60),
    ),
    (
        "microphone int16 mono",
        "audio",
        lambda p: (48000, (tone(1.0, 48000)[0] * 20000).astype(np.int16)),
        AUDIO,
        MediaLimits(),
    ),
    (
        "microphone int16 stereo",
        "audio",
        lambda p: (44100, (tone(1.0, 44100, 2).T * 20000).astype(np.int16)),
        AUDIO,
        MediaLimits(),
    ),
    ("microphone float32", "audio", lambda p: (22050, tone(0.5, 22050)[0]), AUDIO, MediaLimits()),
    ("bare tensor at 16 kHz", "audio", lambda p: torch.zeros(2, 16000), AUDIO, MediaLimits()),
    ("NaN float array", "audio", lambda p: (16000, np.full(1600, np.nan, np.float32)), "NaN", MediaLimits()),
    ("empty recording", "audio", lambda p: (16000, np.zeros(0, np.int16)), "empty", MediaLimits()),
    ("sample rate 0", "audio", lambda p: (0, np.zeros(100, np.int16)), "not valid", MediaLimits()),
    ("3-d samples", "audio", lambda p: (16000, np.zeros((2, 2, 2), np.int16)), "Expected audio samples", MediaLimits()),
    (
        "int64 samples",
        "audio",
        lambda p: (16000, np.zeros(100, np.int64)),
        "Unsupported audio sample type",
        MediaLimits(),
    ),
]
PREPARE = {"image": prepare_image, "video": prepare_video, "audio": prepare_audio}
TRANSFORMS = {"image": ImageTransform(), "video": VideoTransform(num_frames=8), "audio": AudioTransform()}


@pytest.mark.parametrize("name, modality, build, expected, limits", CORPUS, ids=[f"{c[1]}: {c[0]}" for c in CORPUS])
def test_corpus_decodes_or_says_why(tmp_path, name, modality, build, expected, limits):
    src = build(tmp_path)
    if isinstance(expected, str):
        with pytest.raises(MediaError) as error:
            PREPARE[modality](src, TRANSFORMS[modality], limits)
        assert expected in str(error.value)
        assert "Traceback" not in str(error.value) and len(str(error.value)) > 10
    else:
        tensor = PREPARE[modality](src, TRANSFORMS[modality], limits)
        assert tuple(tensor.shape) == expected and tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all()


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 30 and {c[1] for c in CORPUS} == {"image", "video", "audio"}


# -- memory: the decoding budget, video frames one at a time -------------------------------------


def test_the_decoding_budget_is_first_come_first_served_and_never_exceeded():
    """A 10-byte budget: 6 then 6 wait for each other; a 20 waits to run alone; a 1 that comes after
    a waiting 6 does not jump the line; an error inside gives the bytes back."""
    budget = DecodingBudget(10)  # bytes here; MediaLimits holds real budgets to 1 MiB or more
    order, most, lock = [], [0], threading.Lock()

    def decode(name: str, size: int, seconds: float) -> None:
        with budget.hold(size):
            with lock:
                order.append(name)
                most[0] = max(most[0], budget.used)
            time.sleep(seconds)

    first = threading.Thread(target=decode, args=("a6", 6, 0.3))
    first.start()
    time.sleep(0.05)
    waiting = [threading.Thread(target=decode, args=args) for args in (("b6", 6, 0.1), ("c1", 1, 0), ("d20", 20, 0))]
    for thread in waiting:
        thread.start()
        time.sleep(0.05)  # in this order
    for thread in [first, *waiting]:
        thread.join()
    assert order == ["a6", "b6", "c1", "d20"] and most[0] <= 10
    with pytest.raises(RuntimeError), budget.hold(8):
        raise RuntimeError("a damaged file")
    assert budget.used == 0
    with pytest.raises(ValueError, match="max_decoding_bytes must be a whole number from"):
        MediaLimits(max_decoding_bytes=0)
    assert decoding_budget(MediaLimits()) is decoding_budget(MediaLimits(max_pixels=5))  # one per value


@pytest.mark.parametrize("rotation", [None, 90])
def test_sample_video_gives_the_tensor_of_the_full_frames(tmp_path, rotation):
    """Frames resized as they are decoded (decord, and PyAV for a rotated file) make exactly the
    tensor that the full-size frames make, with the same frame numbers and times."""
    path = write_video(tmp_path / "clip.mp4", frames=40, fps=10, size=(320, 176), rotation=rotation)
    transform = VideoTransform(num_frames=8)
    full = sample_frames(path, 8)
    small = sample_video(path, transform)
    assert small.frames.shape == (8, 224, 224, 3) and small.frames.dtype == np.uint8
    assert (small.indices, small.fps, small.duration) == (full.indices, full.fps, full.duration)
    expected = video_tensor(full.frames, transform)
    assert torch.equal(video_tensor(small.frames, transform), expected)
    assert torch.equal(prepare_video(path, transform), expected)
    assert prepare_video(path, transform).stride() == expected.stride()


def test_video_decodes_share_the_memory_budget(tmp_path, monkeypatch):
    """A 320×176 clip is estimated at 80 bytes a frame pixel (4.5 MB): in a budget one and a half times
    that, three clips decode one at a time."""
    path = write_video(tmp_path / "clip.mp4", frames=20, size=(320, 176))
    inside, most, lock = set(), [0], threading.Lock()
    read = video_module._read_decord

    def counted(*args):
        with lock:
            inside.add(threading.get_ident())
            most[0] = max(most[0], len(inside))
        time.sleep(0.2)
        try:
            return read(*args)
        finally:
            with lock:
                inside.discard(threading.get_ident())

    monkeypatch.setattr(video_module, "_read_decord", counted)
    limits = MediaLimits(max_decoding_bytes=320 * 176 * video_module.BYTES_PER_FRAME_PIXEL * 3 // 2)
    threads = [threading.Thread(target=prepare_video, args=(path, VideoTransform(), limits)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1

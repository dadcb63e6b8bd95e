"""Audio clips to AST input, as the original computed them (docs/original.md, "Preprocessing").

Pipeline: decode → first channel → resample to `sample_rate` → subtract the mean → Kaldi fbank
(128 mel bins, 25 ms Hanning window, 10 ms shift, no dither, no energy, HTK-compatible) → pad
with zeros at the end or crop to `target_length` frames → (fbank - mean) / (2 · std).

- Channel: the original passed every channel to `kaldi.fbank`, whose default `channel=-1` means
  `max(-1, 0)`, the *first* channel; there is no mono mix, and there is none here either.
- Rate: the original fed each file at its own rate; we resample to 16 kHz, the rate AST was
  pre-trained at and the rate of the AudioCaps clips as distributed (the rate of the authors' copies
  is not recorded). The rate is the task registry's `preprocess.sample_rate`.
- Decoding uses PyAV (FFmpeg): WAV of any bit depth, MP3, FLAC, Ogg/Opus, M4A/AAC and the audio
  track of video files. Only the start that the model sees (1024 frames ≈ 10.3 s) is decoded,
  so a 10-minute file costs what a 10-second one does. decord's AudioReader is not used: it
  decodes the whole file when opened (time and memory grow with length and rate; bench/RESULTS.md
  has a measurement), reports the native rate as -1, and gave NaN samples for an AAC file;
  `torchaudio.load` needs torchcodec.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import torch
import torchaudio

from .errors import bounded
from .media import MediaError, MediaLimits, check_duration, container_duration, local_path, open_container

log = logging.getLogger(__name__)

FRAME_LENGTH_MS = 25.0  # kaldi.fbank's default window, which the original kept
FRAME_SHIFT_MS = 10.0
RESAMPLE_MARGIN_S = 0.5  # decoded past the model's window so the resampling filter sees real samples at its edge
MAX_RESAMPLE_KERNEL = 2**24  # (rate / gcd) · (sample_rate / gcd): above it torchaudio's sinc kernel would take GBs


@dataclass(frozen=True)
class AudioTransform:
    """The original AST input: log-mel fbank frames, normalised with AudioSet statistics."""

    sample_rate: int = 16000
    mel_bins: int = 128
    target_length: int = 1024
    norm_mean: float = -4.2677393
    norm_std: float = 4.5689974

    def __post_init__(self) -> None:
        bounded("sample_rate", self.sample_rate, 8000, 48000)
        bounded("mel_bins", self.mel_bins, 8, 256)
        bounded("target_length", self.target_length, 16, 4096)  # frames of 10 ms: 41 s at most
        bounded("norm_mean", self.norm_mean, -100, 100, whole=False)
        bounded("norm_std", self.norm_std, 1e-6, 100, whole=False)


def window_seconds(transform: AudioTransform = AudioTransform()) -> float:
    """Seconds of audio behind `target_length` fbank frames: what the model hears (10.255 s)."""
    return (FRAME_LENGTH_MS + (transform.target_length - 1) * FRAME_SHIFT_MS) / 1000.0


def load_audio(
    src: Any, sample_rate: int = 16000, limits: MediaLimits = MediaLimits(), max_seconds: float | None = None
) -> torch.Tensor:
    """[n] float32 mono waveform in [-1, 1] at `sample_rate`: the first channel, resampled.

    `src` is a file (path, bytes or binary file object), a microphone recording as Gradio gives it
    — `(rate, samples)` with int16 (or other int/float) samples of shape [n] or [n, channels] — or
    a bare array/tensor taken to be at `sample_rate`. For 2-D arrays the shorter axis is the
    channel axis. Integers are scaled as WAV files are (int16 / 32768, uint8 centred on 128).
    `max_seconds` stops decoding after that much audio.
    """
    if isinstance(src, tuple):
        if len(src) != 2:
            raise MediaError("A recording must be a (sample_rate, samples) pair.")
        rate, samples = _rate(src[0]), _first_channel(src[1])
    elif isinstance(src, (np.ndarray, torch.Tensor)):
        rate, samples = sample_rate, _first_channel(src)
    else:
        with local_path(src, limits) as path:
            samples, rate = _decode(path, limits, max_seconds)
    check_duration(len(samples) / rate, limits.max_clip_seconds, "recording")
    if max_seconds is not None:
        samples = samples[: math.ceil(max_seconds * rate)]
    wave = torch.from_numpy(_to_float(samples))
    return wave if rate == sample_rate else _resample(wave, rate, sample_rate)


def _rate(value: Any) -> int:
    try:
        rate = int(value)
    except (TypeError, ValueError) as exc:
        raise MediaError(f"The sample rate must be a number of Hz, not {value!r}.") from exc
    if not 1 <= rate <= 1_000_000:
        raise MediaError(f"The sample rate {rate} Hz is not valid.")
    return rate


def _first_channel(samples: Any) -> np.ndarray:
    array = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    if array.ndim == 2:
        array = array[:, 0] if array.shape[0] >= array.shape[1] else array[0]
    if array.ndim != 1:
        raise MediaError(f"Expected audio samples of shape [n] or [n, channels], not {tuple(array.shape)}.")
    if array.size == 0:
        raise MediaError("The recording is empty.")
    return array


def _decode(path: str, limits: MediaLimits, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """First-channel samples (native dtype) and rate of the file's first audio track."""
    with open_container(path, "audio") as container:
        if not container.streams.audio:
            demuxer = container.format.name  # FFmpeg reads a picture with an "image2" or "<codec>_pipe" demuxer
            image = demuxer.endswith("_pipe") or demuxer == "image2"
            extra = " (it is an image)" if image else " (it contains only video)" if container.streams.video else ""
            raise MediaError(f"This file has no audio track{extra}.")
        stream = container.streams.audio[0]
        check_duration(container_duration(container), limits.max_clip_seconds, "recording")
        chunks: list[np.ndarray] = []
        rate, total, wanted = stream.codec_context.sample_rate or 0, 0, None
        try:
            for frame in container.decode(stream):
                if not chunks:
                    rate = _rate(frame.sample_rate or rate)
                    wanted = None if max_seconds is None else math.ceil(max_seconds * rate)
                array = frame.to_ndarray()
                chunks.append(array[0] if frame.format.is_planar else array.reshape(-1, frame.layout.nb_channels)[:, 0])
                total += len(chunks[-1])
                if wanted is not None and total >= wanted:
                    break
                check_duration(total / rate, limits.max_clip_seconds, "recording")  # headers can lie
        except MediaError:
            raise
        except (av.error.FFmpegError, ValueError) as exc:
            if not chunks:
                raise MediaError(
                    f"Could not decode the audio track: the file is damaged or its codec is not supported ({exc})."
                ) from exc
            log.warning("audio decoding stopped early (%s); using the first %.1f s", exc, total / rate)
    if total == 0:
        raise MediaError("The audio track is empty (no samples).")
    return np.concatenate(chunks), rate


def _to_float(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1], scaled as torchaudio.load scaled the original's WAV files."""
    if samples.dtype == np.uint8:
        out = (samples.astype(np.float32) - 128.0) / 128.0
    elif samples.dtype in (np.int8, np.int16, np.int32):
        out = samples.astype(np.float32) / float(2 ** (8 * samples.dtype.itemsize - 1))
    elif np.issubdtype(samples.dtype, np.floating):
        out = samples.astype(np.float32)
    else:
        raise MediaError(f"Unsupported audio sample type {samples.dtype}; use int16 or float samples.")
    if not np.isfinite(out).all():
        raise MediaError("The audio contains NaN or infinite values.")
    return out


def _resample(wave: torch.Tensor, rate: int, sample_rate: int) -> torch.Tensor:
    step = math.gcd(rate, sample_rate)
    if (rate // step) * (sample_rate // step) > MAX_RESAMPLE_KERNEL:
        raise MediaError(
            f"The sample rate {rate} Hz is unusual and cannot be converted to {sample_rate} Hz; "
            "please convert the file to 16, 44.1 or 48 kHz."
        )
    return torchaudio.functional.resample(wave, rate, sample_rate)


def audio_fbank(waveform: torch.Tensor, transform: AudioTransform = AudioTransform()) -> torch.Tensor:
    """[target_length, mel_bins] normalised log-mel fbank of a mono waveform at
    `transform.sample_rate`. The mean is subtracted first, as the original did (Kaldi removes
    each frame's DC offset anyway); a clip shorter than one 25 ms window is zero-padded to one."""
    if waveform.ndim != 1 or waveform.numel() == 0:
        raise ValueError(f"expected a non-empty mono waveform [n], got {tuple(waveform.shape)}")
    wave = waveform.float() - waveform.float().mean()
    window = int(transform.sample_rate * FRAME_LENGTH_MS / 1000.0)
    if wave.numel() < window:
        wave = torch.nn.functional.pad(wave, (0, window - wave.numel()))
    fbank = torchaudio.compliance.kaldi.fbank(
        wave[None],
        htk_compat=True,
        sample_frequency=transform.sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=transform.mel_bins,
        dither=0.0,
        frame_shift=FRAME_SHIFT_MS,
    )
    missing = transform.target_length - fbank.shape[0]
    fbank = torch.nn.functional.pad(fbank, (0, 0, 0, missing)) if missing > 0 else fbank[: transform.target_length]
    return (fbank - transform.norm_mean) / (transform.norm_std * 2)


def load_window(
    src: Any, transform: AudioTransform = AudioTransform(), limits: MediaLimits = MediaLimits()
) -> torch.Tensor:
    """`load_audio` of only the start the model hears (plus the resampling margin): longer than
    `window_seconds` exactly when the clip is cut."""
    return load_audio(src, transform.sample_rate, limits, max_seconds=window_seconds(transform) + RESAMPLE_MARGIN_S)


def prepare_audio(
    src: Any, transform: AudioTransform = AudioTransform(), limits: MediaLimits = MediaLimits()
) -> torch.Tensor:
    """`load_window` then `audio_fbank`: AST input [target_length, mel_bins]."""
    return audio_fbank(load_window(src, transform, limits), transform)

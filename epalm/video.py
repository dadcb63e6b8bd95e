"""Video clips to TimeSformer input, as the original evaluated them (docs/original.md,
"Preprocessing"), made deterministic.

Frames are decoded with decord, as in the original (`VideoReader(path, num_threads=1)`,
`get_batch`), and only the sampled ones: a 20-minute file costs about what a 10-second one does.
Where decord fails (rotated phone videos, GIFs, some containers; its errors are detected, and its
output shape is checked) the same frames are decoded with PyAV, seeking to each one. decord is
optional: it has no wheels for macOS on Apple Silicon nor for aarch64 Linux, and without it every
video is decoded with PyAV (same frames).

Sampling: the original split the clip into `num_frames` equal segments and drew a random frame in
each, even at evaluation; we take the middle of each segment (the original's `middle` mode), so
the same file always gives the same answer. Transform: bicubic resize of the uint8 frames to
size × size without antialiasing (torchvision ≤ 0.14 behaviour for tensors, rounded back to uint8),
then /255 and CLIP normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from .errors import bounded
from .image import CLIP_MEAN, CLIP_STD, check_pixel_transform
from .media import (
    MediaError,
    MediaLimits,
    Source,
    check_duration,
    container_duration,
    decoding_budget,
    local_path,
    open_container,
)

try:
    import decord
except ImportError:  # no wheels for this platform: PyAV decodes every video
    decord = None

log = logging.getLogger(__name__)

MAX_FRAMES = 64  # frames sampled from one clip: each is 224×224×3 floats in memory and 196 tokens in TimeSformer
# a decoding video's memory for each pixel of its frames (decord and FFmpeg's reference frames and threads,
# the float copy of the frame being resized): 0.43-0.64 GB for a 4K clip, measured by bench/decode_memory.py
BYTES_PER_FRAME_PIXEL = 80
SEEK_AHEAD_S = 2.0  # PyAV: decode forward to a frame at most this far ahead, seek to farther ones


@dataclass(frozen=True)
class VideoTransform:
    """Frames sampled per clip and the original test transform."""

    size: int = 224
    num_frames: int = 8
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        check_pixel_transform(self.size, self.mean, self.std)
        bounded("num_frames", self.num_frames, 1, MAX_FRAMES)


@dataclass(frozen=True)
class _Track:
    """What PyAV's header read and first decoded frame tell about the video track."""

    index: int
    width: int
    height: int
    frames: int  # from the container index; 0 when it has none (WebM, MKV, GIF)
    fps: float
    start: float  # seconds
    rotation: int  # degrees counter-clockwise to display it upright (a multiple of 90)
    duration: float | None  # seconds, from the header; None when unknown


@dataclass(frozen=True)
class SampledFrames:
    """The frames a clip gives the model, and where in the clip they are."""

    frames: np.ndarray  # [num_frames, H, W, 3] uint8 RGB, upright
    indices: tuple[int, ...]  # frame numbers in the clip
    fps: float
    duration: float | None  # the clip's length in seconds; None when the file does not say

    @property
    def timestamps(self) -> list[float]:
        """Seconds from the start of the clip at which each sampled frame is shown."""
        return [index / self.fps for index in self.indices]


def frame_indices(num_frames: int, vlen: int) -> list[int]:
    """The frames to decode: the middle of each of min(num_frames, vlen) equal segments (the
    original's segment boundaries), padded by repeating the last index when the clip is short."""
    if vlen < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame and one sample, got vlen={vlen}, num_frames={num_frames}")
    segments = min(num_frames, vlen)
    bounds = np.linspace(0, vlen, segments + 1).astype(int)
    indices = [(int(start) + int(end) - 1) // 2 for start, end in zip(bounds[:-1], bounds[1:])]
    return indices + [indices[-1]] * (num_frames - len(indices))


def load_video_frames(src: Source, num_frames: int = 8, limits: MediaLimits = MediaLimits()) -> np.ndarray:
    """[num_frames, H, W, 3] uint8 RGB frames sampled from a video (path, bytes or file object),
    turned upright when the file says it is rotated."""
    return sample_frames(src, num_frames, limits).frames


def sample_frames(src: Source, num_frames: int = 8, limits: MediaLimits = MediaLimits()) -> SampledFrames:
    """`load_video_frames` with the frame numbers, frame rate and duration of the clip. Every sampled
    frame is held at full size (16 frames of a 4K clip: 0.5 GB); `sample_video` holds one."""
    return _sample(src, num_frames, limits, None)


def sample_video(
    src: Source, transform: VideoTransform = VideoTransform(), limits: MediaLimits = MediaLimits()
) -> SampledFrames:
    """`sample_frames` with each frame resized to `transform.size` (as `video_tensor` resizes it) as soon
    as it is decoded: frames [num_frames, size, size, 3], of which `video_tensor` makes the tensor it makes
    of the full-size frames, while at most one full-size frame is held at a time."""
    return _sample(src, transform.num_frames, limits, transform.size)


def _sample(src: Source, num_frames: int, limits: MediaLimits, size: int | None) -> SampledFrames:
    with local_path(src, limits) as path:
        track = _probe(path, limits)
        held = BYTES_PER_FRAME_PIXEL + (0 if size else 3 * num_frames)  # sample_frames keeps every frame too
        with decoding_budget(limits).hold(track.width * track.height * held):
            return _decode(path, num_frames, track, size)


def _decode(path: str, num_frames: int, track: _Track, size: int | None) -> SampledFrames:
    """The sampled frames, upright, each resized to size × size as soon as it is decoded when `size` is given."""

    def keep(frame: np.ndarray) -> np.ndarray:  # a decoded [H, W, 3] frame
        upright = np.ascontiguousarray(np.rot90(frame, k=track.rotation // 90))
        if size is None:
            return upright
        return _resize_frame(torch.from_numpy(upright).permute(2, 0, 1), size).permute(1, 2, 0).numpy()

    if decord is not None and track.rotation == 0:  # decord ignores rotation and breaks on such files
        try:
            return SampledFrames(*_read_decord(path, num_frames, track, keep), track.fps, track.duration)
        except Exception as exc:  # decord raises its own errors (and worse) on files it cannot handle
            log.info("decord could not decode this video (%s); decoding it with PyAV", str(exc).splitlines()[0][:200])
    frames, indices = _read_pyav(path, num_frames, track, keep)
    return SampledFrames(frames, indices, track.fps, track.duration)


def _probe(path: str, limits: MediaLimits) -> _Track:
    with open_container(path, "a video") as container:
        streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not streams:
            extra = " (it contains only audio)" if container.streams.audio else ""
            raise MediaError(f"This file has no video track{extra}.")
        stream = streams[0]
        if _is_still_image(container, stream):
            raise MediaError(
                f"This file is a still image ({stream.codec_context.name}), not a video: use an image task for it."
            )
        duration = container_duration(container)
        check_duration(duration, limits.max_clip_seconds, "video")
        _check_frame_size(stream.codec_context.width, stream.codec_context.height, limits)  # from the header
        try:
            first = next(container.decode(stream), None)
        except (av.error.FFmpegError, ValueError) as exc:
            raise MediaError(
                f"Could not decode the video track: the file is damaged or its codec is not supported ({exc})."
            ) from exc
        if first is None:
            raise MediaError("The video track has no frames (the file may be empty or truncated).")
        _check_frame_size(first.width, first.height, limits)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else (stream.frames / duration if stream.frames and duration else 25.0)
        start = (
            float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0
        )
        return _Track(
            index=stream.index,
            width=first.width,
            height=first.height,
            frames=stream.frames or 0,
            fps=fps,
            start=start,
            rotation=round((first.rotation or 0) / 90) % 4 * 90,
            duration=duration,
        )


def _is_still_image(container: Any, stream: Any) -> bool:
    """FFmpeg opens pictures as one-frame videos (its image demuxers, or a GIF of one frame); a
    video task would answer about that frame as if it were a clip, so they are refused instead."""
    demuxer = container.format.name
    return demuxer == "image2" or demuxer.endswith("_pipe") or (demuxer == "gif" and stream.frames <= 1)


def _check_frame_size(width: int, height: int, limits: MediaLimits) -> None:
    if width * height > limits.max_frame_pixels:
        limit = limits.max_frame_pixels / 1e6
        raise MediaError(f"The video is {width}×{height} pixels; the limit is {limit:.1f} megapixels per frame.")


def _read_decord(
    path: str, num_frames: int, track: _Track, keep: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The sampled frames, each decoded (seeking as decord's get_batch does) and passed to `keep` in turn."""
    reader = decord.VideoReader(path, num_threads=1)
    vlen = len(reader)
    if vlen < 1:
        raise RuntimeError("decord found no frames")
    indices = frame_indices(num_frames, vlen)

    def decoded() -> Iterator[np.ndarray]:
        for index in sorted(set(indices)):
            frame = reader.get_batch([index]).asnumpy()[0]
            if frame.shape != (track.height, track.width, 3):
                expected = f"{track.height}×{track.width}×3"
                raise RuntimeError(f"decord returned a frame of shape {frame.shape}, expected {expected}")
            yield frame

    return _gather(indices, decoded(), keep), tuple(indices)


def _read_pyav(
    path: str, num_frames: int, track: _Track, keep: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, tuple[int, ...]]:
    vlen = track.frames or _count_frames(path, track.index)
    indices = frame_indices(num_frames, vlen)
    with open_container(path, "a video") as container:
        stream = container.streams[track.index]
        stream.thread_type = "AUTO"
        frames = _gather(indices, _frames_at(container, stream, sorted(set(indices)), track), keep)
    return frames, tuple(indices)


def _gather(indices: list[int], frames: Iterator[np.ndarray], keep: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """[len(indices), ...] of `keep(frame)` for the frames of the distinct sorted indices, in the order and
    with the repeats of `indices`, written into one array as they come (no second copy of them all)."""
    out = None
    for index, frame in zip(sorted(set(indices)), frames):
        kept = keep(frame)
        if out is None:
            out = np.empty((len(indices), *kept.shape), kept.dtype)
        out[[j for j, i in enumerate(indices) if i == index]] = kept
    return out


def _count_frames(path: str, index: int) -> int:
    """Frames in a track whose container has no index: count its packets (no decoding)."""
    with open_container(path, "a video") as container:
        count = sum(1 for packet in container.demux(container.streams[index]) if packet.size)
    if count < 1:
        raise MediaError("The video track has no frames (the file may be empty or truncated).")
    return count


def _frames_at(container: Any, stream: Any, indices: list[int], track: _Track) -> Iterator[np.ndarray]:
    """RGB frames shown at the given (sorted) frame indices, taken as times index / fps. Decodes
    forward to near targets and seeks to the keyframe before far ones; past the end of a
    truncated file the last decoded frame stands in."""
    half = 0.5 / track.fps
    decoded = container.decode(stream)
    current, now, ended = None, track.start, False
    for index in indices:
        target = track.start + index / track.fps
        if not ended and target - now > SEEK_AHEAD_S:
            try:
                container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
                decoded = container.decode(stream)
            except av.error.FFmpegError as exc:  # not seekable: decoding forward is slower but right
                log.info("cannot seek in this video (%s); decoding forward", exc)
        while not ended and (current is None or now < target - half):
            try:
                frame = next(decoded, None)
            except (av.error.FFmpegError, ValueError) as exc:
                if current is None:
                    raise MediaError(f"Could not decode the video track: the file is damaged ({exc}).") from exc
                log.warning("video decoding stopped early (%s); repeating the last good frame", exc)
                frame = None
            if frame is None:
                ended = True
            else:
                current = frame
                now = frame.time if frame.time is not None else now + 1.0 / track.fps
        if current is None:
            raise MediaError("The video track has no frames that can be decoded.")
        yield current.to_ndarray(format="rgb24")


def video_tensor(frames: np.ndarray | torch.Tensor, transform: VideoTransform = VideoTransform()) -> torch.Tensor:
    """[T, 3, size, size] float32 from [T, H, W, 3] uint8 frames: the original test transform
    (non-antialiased bicubic resize of the uint8 frames, rounded back to uint8, /255, normalise).
    Frames are resized one at a time, which gives the same result as the whole batch at once
    with a fraction of the memory; frames already at size × size (`sample_video`'s) are kept as they are."""
    video = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {video.dtype} {tuple(video.shape)}")
    resized = torch.stack([_resize_frame(frame, transform.size) for frame in video.permute(0, 3, 1, 2)])
    return TF.normalize(resized.float().div(255.0), transform.mean, transform.std)


def _resize_frame(frame: torch.Tensor, size: int) -> torch.Tensor:
    """The original's resize of one [3, H, W] uint8 frame to [3, size, size] (both callers view it
    from [H, W, 3] memory: the same layout, so the same kernel and the same numbers)."""
    return TF.resize(frame, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=False)


def prepare_video(
    src: Source, transform: VideoTransform = VideoTransform(), limits: MediaLimits = MediaLimits()
) -> torch.Tensor:
    """`sample_video` then `video_tensor`: TimeSformer input [T, 3, size, size] for one clip (add the
    batch dimension for `pixel_values` [B, T, 3, H, W]), the same as from the full-size frames."""
    return video_tensor(sample_video(src, transform, limits).frames, transform)

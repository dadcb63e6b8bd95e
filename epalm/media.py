"""What the image, video and audio loaders share: the one error type, the limits, and turning a
source (a path, bytes or a file object) into a file a decoder can open.

Every decoding failure reaches the caller as `MediaError`, whose message a person can act on;
decoder exceptions are chained to it (`raise MediaError(...) from exc`) for the logs, never shown
raw. `MediaLimits` bounds what one request may cost in memory and time.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import io
import itertools
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import av

from .errors import UserError, bounded

MiB = 2**20  # the unit of the upload limits (`--max-file-size`), as `describe_bytes` names it
PLAYLIST_FORMATS = {"hls", "dash", "concat"}  # FFmpeg demuxers that open further files named inside the file
Source = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]


class MediaError(UserError, ValueError):
    """A file or array that cannot be turned into model input; the message says why."""


@dataclass(frozen=True)
class MediaLimits:
    """What one input may cost. Durations are read from the file's header (and enforced while
    decoding); only the part of a long clip that the model sees is decoded, so a long file within
    the limit costs about what a short one does."""

    max_file_bytes: int = 200 * MiB
    max_pixels: int = 100_000_000  # an image's width × height, checked before its pixels are decoded
    # memory of the images and videos being decoded at once, by every request that shares these limits (estimated
    # from their pixels): a decode that would pass it waits for others to finish (see DecodingBudget)
    max_decoding_bytes: int = 2**30
    max_frame_pixels: int = 4096 * 2304  # a video frame's width × height (4K fits; the sampled frames stay in memory)
    max_clip_seconds: float = 1800.0  # a video's or audio clip's length (the app's --max-duration)
    # None: any path (a local user named it); else only files inside these folders (a public app: its uploads and
    # examples), every other path refused with one message, whatever is or is not there
    folders: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        bounded("max_decoding_bytes", self.max_decoding_bytes, 2**20, 2**50)  # at least 1 MiB: a budget of 0 waits


def describe_bytes(size: float) -> str:
    """'4.9 GiB', '250 MiB', '12 KiB': binary units, named as such (1 GiB = 2³⁰ bytes), the one convention of
    every size the demo shows: downloads, weights, upload limits. (The Hub and tqdm count in decimal units:
    their "5.30G" is these 4.9 GiB.)"""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{size:.0f} bytes"


def describe_seconds(seconds: float) -> str:
    """'9.5 seconds', '20 minutes', '2.0 hours'."""
    if seconds < 120:
        return f"{seconds:.1f} seconds" if seconds < 10 else f"{seconds:.0f} seconds"
    if seconds < 7200:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


def check_duration(seconds: float | None, limit: float, what: str) -> None:
    """Refuse a clip longer than `limit`; `what` names it in the message ("video", "recording")."""
    if seconds is not None and seconds > limit:
        raise MediaError(f"This {what} is {describe_seconds(seconds)} long; the limit is {describe_seconds(limit)}.")


def _check_size(size: int, limits: MediaLimits) -> None:
    if size == 0:
        raise MediaError("The file is empty.")
    if size > limits.max_file_bytes:
        raise MediaError(f"The file is {describe_bytes(size)}; the limit is {describe_bytes(limits.max_file_bytes)}.")


def _is_path(src: Any) -> bool:
    return isinstance(src, (str, os.PathLike))


NOT_UPLOADED = "This file was not uploaded here."


def check_file(path: str | os.PathLike, limits: MediaLimits) -> Path:
    """The path, once it is known to be a readable, non-empty file within the size limit (and, with
    `limits.folders`, inside one of them: checked before anything at the path is looked at)."""
    path = Path(path).expanduser() if limits.folders is None else check_in_folders(path, limits.folders)
    if not path.exists():
        raise MediaError(f"File not found: {path}")
    kind = not_a_file(path)
    if kind:
        raise MediaError(f"This is {kind}, not a file: {path}")
    _check_size(path.stat().st_size, limits)
    return path


def not_a_file(path: Path) -> str | None:
    """What an existing path is when it is not a regular file ("a folder", "a character device"...), else None."""
    mode = path.stat().st_mode
    kinds = [
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ]
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in kinds if test(mode)), "a special file")


def check_in_folders(path: str | os.PathLike, folders: tuple[str, ...]) -> Path:
    """The resolved path of a regular file inside one of `folders` (symbolic links followed first), else
    `NOT_UPLOADED`: the same words whether the path is missing, a folder, a link out or a file
    elsewhere, so that a caller learns nothing of the server's disk. Nothing at the path is opened."""
    try:
        resolved = Path(os.path.realpath(os.fspath(path)))
        inside = any(resolved.is_relative_to(os.path.realpath(folder)) for folder in folders)
        if inside and resolved.is_file():
            return resolved
    except (TypeError, ValueError, OSError):  # NUL bytes, a name too long, a bytes path
        pass
    raise MediaError(NOT_UPLOADED)


def read_bytes(src: Any, limits: MediaLimits) -> bytes:
    """The content of in-memory bytes or a file object, within the size limit."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif hasattr(src, "read"):
        try:
            data = src.read(limits.max_file_bytes + 1)
        except (OSError, ValueError) as exc:
            raise MediaError(f"Could not read the uploaded file: {exc}") from exc
        if not isinstance(data, (bytes, bytearray)):
            raise MediaError("The file object must be opened in binary mode ('rb').")
    else:
        raise MediaError(f"Expected a file path, bytes or a binary file object, not {type(src).__name__}.")
    _check_size(len(data), limits)
    return bytes(data)


def open_binary(src: Any, limits: MediaLimits) -> IO[bytes] | Path:
    """A path (checked) or an in-memory stream: what Pillow can open lazily."""
    if _is_path(src):
        return check_file(src, limits)
    return io.BytesIO(read_bytes(src, limits))


@contextlib.contextmanager
def local_path(src: Any, limits: MediaLimits) -> Iterator[str]:
    """A file path for decoders that need one (decord): the path itself, or a temporary copy of
    bytes / a file object, removed afterwards."""
    if _is_path(src):
        yield str(check_file(src, limits))
        return
    data = read_bytes(src, limits)
    handle, name = tempfile.mkstemp(prefix="epalm-", suffix=".media")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        yield name
    finally:
        with contextlib.suppress(OSError):
            os.remove(name)


def open_container(path: str, what: str) -> av.container.InputContainer:
    """Open a local file with PyAV (FFmpeg); `what` ("a video", "audio") completes the error
    message. FFmpeg may only read local files, and playlists, which would make it open other
    files, are refused."""
    try:
        container = av.open(path, mode="r", options={"protocol_whitelist": "file"})
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise MediaError(
            f"Could not read this file as {what}: it is damaged, truncated, "
            f"or not a format FFmpeg knows ({_reason(exc)})."
        ) from exc
    if set(container.format.name.split(",")) & PLAYLIST_FORMATS:
        container.close()
        raise MediaError(
            "Playlists (HLS, DASH, concat lists) are not accepted; please upload the video or audio file itself."
        )
    return container


def _reason(exc: BaseException) -> str:
    """The decoder's own words, without error numbers and file names."""
    if isinstance(exc, av.error.FFmpegError):
        return exc.strerror or type(exc).__name__
    return str(exc) or type(exc).__name__


def container_duration(container: av.container.InputContainer) -> float | None:
    """Seconds, from the container header or else its longest stream; None when unknown."""
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    durations = [float(s.duration * s.time_base) for s in container.streams if s.duration and s.time_base]
    return max(durations) if durations else None


class DecodingBudget:
    """At most `total` bytes of media being decoded at once, across threads: `hold(n)` waits, first come
    first served, until n more bytes fit (a decode larger than `total` waits to run alone). Each decoder
    estimates its n from the pixels it holds (`image.BYTES_PER_PIXEL`, `video.BYTES_PER_FRAME_PIXEL`);
    the memory a large decode freed is handed back to the system before the budget is."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._changed = threading.Condition()
        self._line: collections.deque[int] = collections.deque()
        self._tickets = itertools.count()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = min(max(nbytes, 0), self.total)
        with self._changed:
            ticket = next(self._tickets)
            self._line.append(ticket)
            try:
                self._changed.wait_for(lambda: self._line[0] == ticket and self.used + nbytes <= self.total)
            finally:
                self._line.remove(ticket)
                self._changed.notify_all()  # the next in line may fit as well
            self.used += nbytes
        try:
            yield
        finally:
            if nbytes >= TRIM_ABOVE_BYTES:
                hand_back_memory()
            with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


TRIM_ABOVE_BYTES = 32 * 2**20  # after a decode this large, the memory it freed goes back to the system at once
_BUDGETS: dict[int, DecodingBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def decoding_budget(limits: MediaLimits) -> DecodingBudget:
    """This process's budget for `limits.max_decoding_bytes`, shared by every pipeline with that value."""
    with _BUDGETS_LOCK:
        if limits.max_decoding_bytes not in _BUDGETS:
            _BUDGETS[limits.max_decoding_bytes] = DecodingBudget(limits.max_decoding_bytes)
        return _BUDGETS[limits.max_decoding_bytes]


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None (macOS, musl: their allocators hand memory back by themselves)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def hand_back_memory() -> None:
    """Return the memory freed by a large decode to the system now. glibc keeps freed blocks in the
    arena of the thread that freed them (a server's worker threads have one each), so without this a
    few large uploads leave the process gigabytes larger for good (bench/decode_memory.py)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)

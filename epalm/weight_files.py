"""Weight files mapped into memory: checkpoints read without a copy (`open_checkpoint`), and the
language model's weights as served, kept on disk for the next start and mapped from there (`load`, `keep`).

Reading OPT-2.7B's float16 `pytorch_model.bin` and casting it to the serving dtype is most of a cold start
(bench/RESULTS.md). The cast weights are written once, next to the Hub cache, as a safetensors file per LM
and dtype; the next start maps that file instead (the page cache hands it over without a copy), and the
parameters stay backed by it until the store packs them.

- Packed weights (`model.PackedLinear`) cannot be kept: oneDNN's blocked tensors are opaque (torch can
  neither save nor map them), so the file holds the cast weights and the store packs them at each start.
- An entry is used only if it was written from the same source files (their content hash, which names a
  file in the Hub cache, else their path, size and time), for the same dtype, by the same torch and format
  version; otherwise it is written again. There is one entry per LM and dtype, so the cache never holds
  more than one copy of each: its size is the LM's parameters in that dtype (OPT-2.7B: 5.3 GB in
  bfloat16, 10.6 GB in float32; OPT-6.7B: 13.3 / 26.6 GB).
- It is written in the background after the first load, tensor by tensor from the source (no second
  copy of the model in memory; the start is not slowed by the disk), to a temporary file renamed into
  place when complete: concurrent writers and interrupted writes never leave a partial entry. A process
  that exits while writing waits for it (`finish`), unless it is killed; an abandoned temporary file is
  removed by the next writer.

EPALM_CACHE names the folder (default: `epalm` beside the Hub cache, e.g. ~/.cache/huggingface/epalm);
EPALM_CACHE=off turns the cache off.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import ctypes
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from safetensors import safe_open
from safetensors.torch import load_file

log = logging.getLogger(__name__)

FORMAT = "1"  # the version of what an entry holds: raise it when that changes
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_CHUNK = 32768  # elements cast at a time: below torch's parallel grain, so the background cast stays on one core
_ABANDONED_S = 600.0  # a temporary file left this long without a write is a dead writer's
_writers: dict[Path, threading.Thread] = {}
_writers_lock = threading.Lock()


def folder() -> Path | None:
    """Where the entries are (None: the cache is off)."""
    named = os.environ.get("EPALM_CACHE", "").strip()
    if named.lower() == "off":
        return None
    return Path(named).expanduser() if named else Path(hub_constants.HF_HUB_CACHE).parent / "epalm"


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16', ... (the names `store.resolve_dtype` accepts)."""
    return str(dtype).removeprefix("torch.")


def entry_path(repo_id: str, dtype: torch.dtype) -> Path | None:
    """The entry of this LM in this dtype (whether or not it exists)."""
    root = folder()
    if root is None:
        return None
    return root / "weights" / repo_id.replace("/", "--") / f"{dtype_name(dtype)}.safetensors"


def _metadata(repo_id: str, sources: list[Path], dtype: torch.dtype) -> dict[str, str]:
    """What an entry must have been written from to be used."""
    identities = []
    for path in sources:
        real = path.resolve()
        stat = real.stat()
        if real.parent.name == "blobs":  # the Hub cache names each file by its content's hash
            identities.append(f"{real.name}:{stat.st_size}")
        else:
            identities.append(f"{real}:{stat.st_size}:{stat.st_mtime_ns}")
    sources_text = json.dumps(identities)
    return {
        "format": FORMAT,
        "repo": repo_id,
        "dtype": dtype_name(dtype),
        "torch": torch.__version__,
        "sources": sources_text,
    }


def load(repo_id: str, sources: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The kept weights of `repo_id` in `dtype`, memory-mapped (no copy, nothing read until used), if an
    entry written from these source files by this torch exists; None otherwise."""
    path = entry_path(repo_id, dtype)
    if path is None or dtype not in _DTYPES or not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as entry:
            kept = entry.metadata() or {}
        if kept != _metadata(repo_id, sources, dtype):
            log.info("the kept weights of %s in %s are out of date; they will be written again", repo_id, dtype)
            return None
        return load_file(path)
    except (OSError, ValueError, RuntimeError) as exc:  # unreadable: written again
        log.warning("cannot read the kept weights %s (%s); they will be written again", path, exc)
        return None


def keep(repo_id: str, sources: list[Path], dtype: torch.dtype, size: int) -> None:
    """Write the entry of `repo_id` in `dtype` from its source files, in a background thread (one writer
    per entry in this process). `size`: the entry's bytes, to check the disk's room first."""
    path = entry_path(repo_id, dtype)
    if path is None or dtype not in _DTYPES:
        return
    metadata = _metadata(repo_id, sources, dtype)
    with _writers_lock:
        if path in _writers and _writers[path].is_alive():
            return
        thread = threading.Thread(
            target=_write_logged, args=(path, sources, dtype, metadata, size), name="epalm-keep-weights", daemon=True
        )
        _writers[path] = thread
    thread.start()


def finish(timeout: float | None = None) -> None:
    """Wait for the entries being written (the process exits only once they are complete)."""
    with _writers_lock:
        writers = [thread for thread in _writers.values() if thread.is_alive()]
    if writers:
        log.warning("finishing the kept weights for the next start…")
    for thread in writers:
        thread.join(timeout)


atexit.register(finish)


def _write_logged(path: Path, sources: list[Path], dtype: torch.dtype, metadata: dict[str, str], size: int) -> None:
    with contextlib.suppress(OSError, AttributeError):  # Linux: this thread yields to the serving ones
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    started = time.perf_counter()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(path.parent)
        free = shutil.disk_usage(path.parent).free
        if free < size + 2**30:
            log.warning(
                "not keeping the %s weights of %s for the next start: they need %.1f GB, %s has %.1f GB free",
                metadata["dtype"],
                metadata["repo"],
                size / 1e9,
                path.parent,
                free / 1e9,
            )
            return
        write(path, sources, dtype, metadata)
    except Exception:  # a failed write costs the next start its speed, nothing else
        log.exception("could not keep the weights of %s in %s", metadata["repo"], path)
        return
    log.info(
        "kept the %s weights of %s for the next start in %.1f s: %s",
        metadata["dtype"],
        metadata["repo"],
        time.perf_counter() - started,
        path,
    )


def write(path: Path, sources: list[Path], dtype: torch.dtype, metadata: dict[str, str]) -> None:
    """A safetensors file of every tensor of `sources` cast to `dtype` (what `pretrained.read_weights`
    returns), written tensor by tensor from the sources' mapped pages to a temporary file renamed into
    place once complete and on disk."""
    parts = [open_checkpoint(source) for source in sources]
    if any(release is None for _, release in parts):
        log.info("not keeping %s: its checkpoint cannot be mapped (torch's legacy format)", metadata["repo"])
        return
    tensors = [(key, tensor, release) for state, release in parts for key, tensor in state.items()]
    header, offset = {"__metadata__": metadata}, 0
    for key, tensor, _ in tensors:
        nbytes = tensor.numel() * dtype.itemsize
        header[key] = {"dtype": _DTYPES[dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 64)  # the data starts on a cache line, and so does every weight matrix
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            chunk = torch.empty(_CHUNK, dtype=dtype)
            for _, tensor, release in tensors:
                flat = tensor.reshape(-1)
                for start in range(0, flat.numel(), _CHUNK):
                    part = chunk[: min(_CHUNK, flat.numel() - start)]
                    part.copy_(flat[start : start + _CHUNK])
                    out.write(part.view(torch.uint8).numpy().data)
                release(tensor)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)  # as the Hub cache's files (mkstemp makes it the owner's only)
        os.replace(temporary, path)  # atomic: readers see the old entry or the new one, never part of one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _remove_abandoned(where: Path) -> None:
    """Delete temporary files that no writer has touched for a while (a killed process's)."""
    for temporary in where.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - temporary.stat().st_mtime > _ABANDONED_S:
                temporary.unlink()


def open_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], Callable[[torch.Tensor], None] | None]:
    """A weight file's tensors, memory-mapped where it can be (a `.bin` in torch's zip format, a
    `.safetensors`), and how to release a mapped tensor's pages once it is copied (None: the tensors are
    in memory, or this system cannot release pages)."""
    release = page_release()
    if path.suffix == ".safetensors":
        return load_file(path), release
    if release is not None:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), release
        except RuntimeError:  # a file in torch's legacy (pre-zip) format cannot be mapped
            pass
    return torch.load(path, map_location="cpu", weights_only=True), None


_MADV_DONTNEED = 4  # the same on Linux and macOS


def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):  # no C library symbols to look up (Windows)
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def page_release() -> Callable[[torch.Tensor], None] | None:
    """A function that drops a memory-mapped tensor's pages from this process (madvise DONTNEED; the
    mapping is private and never written, so a page touched again is read again from the file)."""
    madvise, page = _madvise(), mmap.PAGESIZE
    if madvise is None:
        return None

    def release(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        start = storage.data_ptr() // page * page
        end = -(-(storage.data_ptr() + storage.nbytes()) // page) * page
        madvise(start, end - start, _MADV_DONTNEED)  # advice: a failure only leaves the pages resident

    return release


def mapped_release() -> Callable[[torch.Tensor], None] | None:
    """A function that hands back the pages of a tensor mapped from a kept-weights file (once the store
    has packed a copy of it), so that the process does not hold both; any other tensor is left alone.
    Only whole pages inside the tensor are released: the mapping is private and never written, so a page
    touched again is read again from the file. None where the mappings cannot be listed (no /proc)."""
    root, madvise, page = folder(), _madvise(), mmap.PAGESIZE
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    if root is None or madvise is None:
        return None
    ours = str(root.resolve()) + os.sep
    ranges = []
    for line in maps.splitlines():  # "start-end perms offset device inode   path" (anonymous: no path)
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(ours) and fields[5].endswith(".safetensors"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    ranges.sort()
    starts = [start for start, _ in ranges]

    def release(tensor: torch.Tensor) -> None:
        first = tensor.untyped_storage().data_ptr()
        last = first + tensor.untyped_storage().nbytes()
        index = bisect.bisect_right(starts, first) - 1
        if index < 0 or last > ranges[index][1]:
            return  # not (wholly) inside a kept-weights mapping: memory of its own, or another file's
        begin, end = -(-first // page) * page, last // page * page
        if end > begin:
            madvise(begin, end - begin, _MADV_DONTNEED)

    return release

"""The LM's weights kept for the next start: mapped instead of read, invalidated by what they came from,
one entry per LM and dtype, written whole or not at all."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from epalm import pretrained, weight_files
from epalm.tiny import tiny_lm, tiny_tokenizer

NAME = "someone/opt-tiny"


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "kept"
    monkeypatch.setenv("EPALM_CACHE", str(folder))
    return folder


def write_checkpoint(folder: Path, seed: int = 0) -> list[Path]:
    """An OPT folder as the Hub serves facebook/opt-*: its config, a tokenizer, float16 `decoder.*` weights."""
    lm = tiny_lm(seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    lm.config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    state = {k.removeprefix("model."): v.half() for k, v in lm.state_dict().items() if k.startswith("model.")}
    torch.save(state, folder / "pytorch_model.bin")
    return [folder / "pytorch_model.bin"]


def load(folder: Path, weights: list[Path], dtype: torch.dtype, heard: list[str] | None = None):
    lm, _ = pretrained.load_lm(NAME, folder, weights, dtype, heard.append if heard is not None else None, keep=True)
    weight_files.finish()
    return lm


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_weights_are_kept_then_mapped_on_the_next_start(tmp_path, cache, monkeypatch, dtype):
    weights = write_checkpoint(tmp_path / "opt")
    heard: list[str] = []
    first = load(tmp_path / "opt", weights, dtype, heard)
    entry = weight_files.entry_path(NAME, dtype)
    assert len(heard) == 1 and heard[0].startswith(f"Reading the weights of {NAME} (") and entry.is_file()
    reads: list[int] = []
    real_read = pretrained.read_weights
    monkeypatch.setattr(pretrained, "read_weights", lambda *a: reads.append(1) or real_read(*a))
    heard.clear()
    second = load(tmp_path / "opt", weights, dtype, heard)
    assert reads == [] and heard[0].startswith(f"Mapping the {str(dtype)[6:]} weights of {NAME} kept from an earlier")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert second.dtype == dtype and str(entry) in mapped_files(), "the parameters are the file's pages"
    expected = sum(t.numel() for t in torch.load(weights[0], weights_only=True).values()) * dtype.itemsize
    header = struct.unpack("<Q", entry.read_bytes()[:8])[0]
    assert entry.stat().st_size == 8 + header + expected, "nothing but the weights in the dtype"


def test_an_entry_is_used_only_for_its_source_dtype_and_torch(tmp_path, cache, monkeypatch):
    folder = tmp_path / "opt"
    weights = write_checkpoint(folder, seed=0)
    load(folder, weights, torch.float32)
    assert weight_files.load(NAME, weights, torch.float32) is not None
    assert weight_files.load(NAME, weights, torch.bfloat16) is None, "another dtype: another entry"
    monkeypatch.setattr(torch, "__version__", "0.0.0-another")
    assert weight_files.load(NAME, weights, torch.float32) is None, "another torch"
    monkeypatch.undo()
    monkeypatch.setenv("EPALM_CACHE", str(cache))
    time.sleep(0.01)
    write_checkpoint(folder, seed=1)  # the source changed: the old entry must not be served
    assert weight_files.load(NAME, weights, torch.float32) is None
    lm = load(folder, weights, torch.float32)
    kept = weight_files.load(NAME, weights, torch.float32)
    assert kept is not None and torch.equal(kept["decoder.embed_tokens.weight"], lm.model.decoder.embed_tokens.weight)
    files = sorted(p.name for p in weight_files.entry_path(NAME, torch.float32).parent.iterdir())
    assert files == ["float32.safetensors"], "one entry per LM and dtype, nothing left beside it"


def test_a_hub_cache_file_is_known_by_its_content_hash(tmp_path, cache):
    """In the Hub cache a snapshot's file links to a blob named by its content's hash: a copy of the cache
    elsewhere (new paths, new times) keeps its entries."""
    source = write_checkpoint(tmp_path / "opt")[0]
    for root in ("a", "b"):
        blob = tmp_path / root / "blobs" / ("0" * 64)
        blob.parent.mkdir(parents=True)
        blob.write_bytes(source.read_bytes())
        link = tmp_path / root / "snapshots" / "c0ffee" / "pytorch_model.bin"
        link.parent.mkdir(parents=True)
        link.symlink_to(blob)
    first, copy = (
        [tmp_path / "a/snapshots/c0ffee/pytorch_model.bin"],
        [tmp_path / "b/snapshots/c0ffee/pytorch_model.bin"],
    )
    weight_files.keep(NAME, first, torch.float32, 10**6)
    weight_files.finish()
    assert weight_files.load(NAME, copy, torch.float32) is not None
    meta = json.loads(weight_files._metadata(NAME, first, torch.float32)["sources"])
    assert meta == [f"{'0' * 64}:{source.stat().st_size}"]


def test_a_failed_or_interrupted_write_leaves_no_entry(tmp_path, cache, monkeypatch):
    weights = write_checkpoint(tmp_path / "opt")
    entry = weight_files.entry_path(NAME, torch.float32)
    entry.parent.mkdir(parents=True)
    abandoned, live = entry.parent / ".float32.safetensors.dead.tmp", entry.parent / ".float32.safetensors.live.tmp"
    abandoned.write_bytes(b"half a file")
    live.write_bytes(b"another writer, still at it")
    os.utime(abandoned, (time.time() - 3600, time.time() - 3600))

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    load(tmp_path / "opt", weights, torch.float32)
    assert not entry.exists() and sorted(p.name for p in entry.parent.iterdir()) == [live.name]
    assert weight_files.load(NAME, weights, torch.float32) is None


def test_concurrent_writers_leave_one_whole_entry(tmp_path, cache):
    weights = write_checkpoint(tmp_path / "opt")
    entry = weight_files.entry_path(NAME, torch.bfloat16)
    entry.parent.mkdir(parents=True)
    metadata = weight_files._metadata(NAME, weights, torch.bfloat16)
    writers = [
        threading.Thread(target=weight_files.write, args=(entry, weights, torch.bfloat16, metadata)) for _ in range(4)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    kept = weight_files.load(NAME, weights, torch.bfloat16)
    expected = pretrained.read_weights(weights, torch.bfloat16)
    assert kept.keys() == expected.keys() and all(torch.equal(kept[k], v) for k, v in expected.items())
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("EPALM_CACHE", "off")
    weights = write_checkpoint(tmp_path / "opt")
    load(tmp_path / "opt", weights, torch.float32)
    assert weight_files.entry_path(NAME, torch.float32) is None
    assert weight_files.load(NAME, weights, torch.float32) is None


def test_released_pages_are_only_those_of_kept_weights(tmp_path, cache, monkeypatch):
    """After packing, the dense weights mapped from an entry are handed back (whole pages inside the
    tensor only); a tensor of the process's own memory is never touched (releasing it would zero it)."""
    weights = write_checkpoint(tmp_path / "opt")
    load(tmp_path / "opt", weights, torch.float32)
    kept = weight_files.load(NAME, weights, torch.float32)
    madvise = weight_files._madvise()
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(weight_files, "_madvise", lambda: lambda *call: calls.append(call) or madvise(*call))
    release = weight_files.mapped_release()
    own = torch.arange(300_000, dtype=torch.float32)
    release(own)
    assert calls == [] and torch.equal(own, torch.arange(300_000, dtype=torch.float32))
    big = max(kept.values(), key=lambda t: t.numel())
    before = big.clone()
    release(big)
    page, start, end = os.sysconf("SC_PAGE_SIZE"), big.data_ptr(), big.data_ptr() + big.numel() * 4
    assert calls == [(-(-start // page) * page, end // page * page - -(-start // page) * page, 4)]
    assert torch.equal(big, before), "a released page is read again from the file"

"""The pretrained models' weights: sharded checkpoints located, read straight into the dtype."""

from __future__ import annotations

import json

import pytest
import torch

from epalm import pretrained, weight_files


def test_a_sharded_checkpoint_is_located_with_its_shards_and_read_into_the_dtype(fake_hub):
    """opt-6.7b's layout: `pytorch_model.bin.index.json` naming two shards, no safetensors."""
    import io

    from epalm.hub import WEIGHT_FILES, RepoFiles, locate

    shards = {
        "pytorch_model-00001-of-00002.bin": {"a": torch.ones(2, dtype=torch.float16)},
        "pytorch_model-00002-of-00002.bin": {"b": torch.full((3,), 2.0, dtype=torch.float16)},
    }
    index = {"metadata": {}, "weight_map": {key: name for name, state in shards.items() for key in state}}
    fake_hub.add("facebook/opt-6.7b", "pytorch_model.bin.index.json", json.dumps(index).encode())
    for name, state in shards.items():
        buffer = io.BytesIO()
        torch.save(state, buffer)
        fake_hub.add("facebook/opt-6.7b", name, buffer.getvalue())
    files = RepoFiles("the language model facebook/opt-6.7b", "facebook/opt-6.7b", weights=WEIGHT_FILES)
    found = locate(files)
    assert list(found) == ["pytorch_model.bin.index.json", *shards]
    state = pretrained.read_weights([found[name] for name in shards], torch.float32)
    assert state["a"].dtype == torch.float32 and state["b"].tolist() == [2.0, 2.0, 2.0]
    assert locate(files, local_only=True) == found, "then known to the cache, absent files included"


@pytest.mark.parametrize("madvise", [True, False], ids=["mapped", "read_whole"])
def test_weights_are_cast_from_the_file_and_own_their_memory(tmp_path, monkeypatch, madvise):
    """Memory-mapped and released page by page where madvise exists, read whole where it does not:
    the same tensors either way, none left backed by the file (which may change in the cache)."""
    released: list[int] = []
    if madvise:
        release = weight_files.page_release()
        assert release is not None, "this machine's C library has madvise"
        monkeypatch.setattr(weight_files, "page_release", lambda: lambda t: (released.append(t.numel()), release(t)))
    else:
        monkeypatch.setattr(weight_files, "page_release", lambda: None)
    generator = torch.Generator().manual_seed(0)
    original = {f"w{i}": torch.randn(300, 700 + i, generator=generator).half() for i in range(4)}
    original["same"] = torch.randn(5000, generator=generator).half()
    path = tmp_path / "pytorch_model.bin"
    torch.save(original, path)
    cast = pretrained.read_weights([path], torch.bfloat16)
    kept = pretrained.read_weights([path], torch.float16)  # no cast: still a copy
    assert sorted(released) == (sorted([v.numel() for v in original.values()] * 2) if madvise else [])
    path.write_bytes(b"\0" * path.stat().st_size)  # a changed file cannot change the loaded weights
    assert all(torch.equal(cast[k], v.to(torch.bfloat16)) and torch.equal(kept[k], v) for k, v in original.items())
    torch.save(original, path, _use_new_zipfile_serialization=False)  # torch's legacy format cannot be mapped
    assert all(torch.equal(t, original[k]) for k, t in pretrained.read_weights([path], torch.float16).items())

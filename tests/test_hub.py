"""Adapters and weights through huggingface_hub: download, cache, offline, formats, safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from epalm.__main__ import main
from epalm.errors import UserError
from epalm.hub import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    AdapterError,
    WeightsUnavailable,
    convert,
    fetch,
    is_cached,
    load_adapter,
    push_to_hub,
    read_adapter,
)
from epalm.parity import load_case
from epalm.tasks import AdapterSource, load_registry

from conftest import PARITY_CASES, ROOT, FakeHub, save_numpy1_checkpoint


def fixture_task(case):
    """A registry task whose injection is the fixture's (the adapter file is the fixture's)."""
    manifest, lm, encoder, adapter = load_case(case)
    task = replace(load_registry()["image-caption"], id=f"fixture-{case.name}", injection=adapter.config)
    return task, lm, encoder, adapter


def test_download_then_cache_then_offline(fake_hub, monkeypatch):
    import huggingface_hub.constants as constants

    data = (PARITY_CASES[0] / "adapters.pth").read_bytes()
    fake_hub.add("someone/epalm", "checkpoints/a/checkpoint_best.pth", data, repo_type="space")
    source = AdapterSource("checkpoints/a/checkpoint_best.pth", "someone/epalm", repo_type="space")
    assert not is_cached(source)
    messages = []
    first = fetch(source, progress=messages.append)
    assert first.read_bytes() == data and len(fake_hub.downloads) == 1 and is_cached(source)
    label = "Downloading checkpoints/a/checkpoint_best.pth in the Space someone/epalm"
    assert messages[-1] == f"{label}: 90 KB of 90 KB (100%)"
    assert fetch(source) == first and len(fake_hub.downloads) == 1, "second call is served from the cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.server.shutdown()
    assert fetch(source) == first, "offline mode works from the cache"
    missing = r"b/checkpoint_best.pth in the Space someone/epalm is not in the local Hugging Face cache .*OFFLINE=1"
    with pytest.raises(WeightsUnavailable, match=missing):
        fetch(AdapterSource("checkpoints/b/checkpoint_best.pth", "someone/epalm", repo_type="space"))


def test_offline_environment_variable_is_honoured_in_a_fresh_process(fake_hub, tmp_path):
    fake_hub.add("someone/epalm", "x.pth", b"not used")
    code = (
        "from epalm.hub import fetch, WeightsUnavailable\nfrom epalm.tasks import AdapterSource\n"
        "try:\n    fetch(AdapterSource('x.pth', 'someone/epalm'))\n"
        "except WeightsUnavailable as e:\n    print('REFUSED', e)\n"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "REFUSED" in out.stdout and "someone/epalm" in out.stdout, out.stderr
    assert fake_hub.downloads == [], "no request was made while offline"


def test_missing_file_names_the_repo_and_file(fake_hub):
    with pytest.raises(WeightsUnavailable, match=r"Cannot get the adapter: there is no nope.pth in someone/epalm"):
        fetch(AdapterSource("nope.pth", "someone/epalm"))


def test_push_uploads_only_the_adapter_files_or_says_why_it_cannot(fake_hub, tmp_path, monkeypatch):
    import shutil
    import socket

    import huggingface_hub.constants as constants

    out = tmp_path / "converted"
    out.mkdir()
    shutil.copy(PARITY_CASES[0] / "adapters.pth", out)  # converted next to the original, which stays local
    monkeypatch.setenv("HF_TOKEN", FakeHub.TOKEN)
    argv = ["convert", str(out / "adapters.pth"), str(out), "--task", "image-caption", "--push-to-hub", "someone/conv"]
    assert main(argv) == 0
    [(repo, _, files)] = fake_hub.commits
    assert repo == "someone/conv" and sorted(files) == sorted(ADAPTER_FILES) and (out / "adapters.pth").is_file()
    with pytest.raises(UserError, match=r"Cannot upload to 'conv': give a Hub repo id \(user/name\)"):
        push_to_hub(out, "conv")
    with socket.socket() as closed:  # bound, not listening: the connection is refused
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        with pytest.raises(
            WeightsUnavailable, match=r"Cannot upload to someone/conv: the Hub \(http://127.0.0.1:\d+\) cannot"
        ):
            push_to_hub(out, "someone/conv")


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda p: p.name)
def test_original_pth_and_converted_format_give_identical_outputs(case, tmp_path):
    task, lm, encoder, _ = fixture_task(case)
    out = convert(case / "adapters.pth", task, tmp_path / "converted")
    original, converted = read_adapter(case / "adapters.pth"), read_adapter(out)
    assert original.keys() == converted.keys()
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["injection"]["num_features"] == task.injection.num_features and (out / "README.md").is_file()
    features = torch.randn(task.injection.num_features, 2, encoder.dim)
    dims = (encoder.dim, lm.config.hidden_size, lm.config.word_embed_proj_dim)
    a, b = (load_adapter(task, state, *dims).prefix(features) for state in (original, converted))
    assert torch.equal(a.visual, b.visual) and torch.equal(a.prompt, b.prompt)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": {"connector.0.weight": torch.zeros(2, 2)}, "config": _Payload(str(marker))}, path)
    with pytest.raises(
        AdapterError, match=r"Refused to load checkpoint_best.pth: it asks to run Python code \(io.open\)"
    ):
        read_adapter(path)
    assert not marker.exists()


def test_the_refusal_names_every_global_including_blocked_modules(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": {}, "a": _System(f"touch {marker}"), "b": _Payload(str(marker))}, path)
    with pytest.raises(AdapterError, match=r"asks to run Python code \(io.open, posix.system\)"):
        read_adapter(path)
    assert not marker.exists()


def test_a_real_style_checkpoint_with_numpy_scalars_loads(tmp_path):
    import numpy as np

    state = torch.load(PARITY_CASES[0] / "adapters.pth", weights_only=True)
    state.update(config={"lr": 2e-5, "num_beams": 3}, epoch=7, best_valid=np.float64(1.23), best_epoch=np.int64(5))
    torch.save(state, tmp_path / "real.pth")
    assert read_adapter(tmp_path / "real.pth").keys() == state["model"].keys()
    save_numpy1_checkpoint(state, tmp_path / "numpy1.pth")
    assert read_adapter(tmp_path / "numpy1.pth").keys() == state["model"].keys(), "numpy 1 pickles load too"


def test_only_numpy_scalars_are_allowed_under_the_numpy_1_names(tmp_path):
    import numpy as np

    path = save_numpy1_checkpoint({"model": {}, "best_valid": np.float64(1), "table": np.zeros(3)}, tmp_path / "x.pth")
    refused = r"asks to run Python code \(numpy\._core\.multiarray\._reconstruct, numpy\.ndarray\)"
    with pytest.raises(AdapterError, match=refused):
        read_adapter(path)


def test_wrong_shapes_name_the_task_key_and_both_shapes():
    case = PARITY_CASES[0]
    task, lm, encoder, _ = fixture_task(case)
    state = read_adapter(case / "adapters.pth")
    state["connector.1.weight"] = torch.zeros(7, 5)
    with pytest.raises(AdapterError, match=r"fixture-.*connector\.1\.weight.*\(7, 5\).*need \("):
        load_adapter(task, state, encoder.dim, lm.config.hidden_size, lm.config.word_embed_proj_dim)
    del state["connector.1.weight"]
    with pytest.raises(AdapterError, match="missing keys.*connector.1.weight"):
        load_adapter(task, state, encoder.dim, lm.config.hidden_size, lm.config.word_embed_proj_dim)


def test_corrupt_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="not a readable PyTorch checkpoint"):
        read_adapter(tmp_path / "bad.pth")


def test_a_sharded_checkpoint_is_located_with_its_shards_and_read_into_the_dtype(fake_hub):
    """opt-6.7b's layout: `pytorch_model.bin.index.json` naming two shards, no safetensors."""
    import io

    from epalm.hub import WEIGHT_FILES, RepoFiles, locate, read_weights

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
    state = read_weights([found[name] for name in shards], torch.float32)
    assert state["a"].dtype == torch.float32 and state["b"].tolist() == [2.0, 2.0, 2.0]
    assert locate(files, local_only=True) == found, "then known to the cache, absent files included"


@pytest.mark.parametrize("madvise", [True, False], ids=["mapped", "read_whole"])
def test_weights_are_cast_from_the_file_and_own_their_memory(tmp_path, monkeypatch, madvise):
    """Memory-mapped and released page by page where madvise exists, read whole where it does not:
    the same tensors either way, none left backed by the file (which may change in the cache)."""
    from epalm import hub

    released: list[int] = []
    if madvise:
        release = hub._page_release()
        assert release is not None, "this machine's C library has madvise"
        monkeypatch.setattr(hub, "_page_release", lambda: lambda t: (released.append(t.numel()), release(t)))
    else:
        monkeypatch.setattr(hub, "_page_release", lambda: None)
    generator = torch.Generator().manual_seed(0)
    original = {f"w{i}": torch.randn(300, 700 + i, generator=generator).half() for i in range(4)}
    original["same"] = torch.randn(5000, generator=generator).half()
    path = tmp_path / "pytorch_model.bin"
    torch.save(original, path)
    cast = hub.read_weights([path], torch.bfloat16)
    kept = hub.read_weights([path], torch.float16)  # no cast: still a copy
    assert sorted(released) == (sorted([v.numel() for v in original.values()] * 2) if madvise else [])
    path.write_bytes(b"\0" * path.stat().st_size)  # a changed file cannot change the loaded weights
    assert all(torch.equal(cast[k], v.to(torch.bfloat16)) and torch.equal(kept[k], v) for k, v in original.items())
    torch.save(original, path, _use_new_zipfile_serialization=False)  # torch's legacy format cannot be mapped
    assert all(torch.equal(t, original[k]) for k, t in hub.read_weights([path], torch.float16).items())

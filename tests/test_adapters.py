"""Trained adapters from a Hub repo (the loopback fake Hub) or a folder."""

from __future__ import annotations

import pytest

from epalm.adapters import adapter_task, resolve_adapter
from epalm.hub import AdapterError, WeightsUnavailable, adapter_config, save_adapter
from epalm.pipeline import Pipeline
from epalm.tiny import tiny_adapter


def saved_tiny_adapter(folder, pipe: Pipeline):
    task = pipe.task("image-caption")
    config = {**adapter_config(task), "base_task": task.id, "tiny": True}
    return save_adapter(tiny_adapter(task.injection, seed=7).state_dict(), config, "# card\n", folder)


def test_adapter_from_a_hub_repo_equals_the_same_folder(fake_hub, tmp_path, media_files):
    pipe = Pipeline(device="cpu", tiny=True)
    folder = saved_tiny_adapter(tmp_path / "mine", pipe)
    for name in ("adapter.safetensors", "adapter_config.json"):
        fake_hub.add("someone/colours", name, (folder / name).read_bytes())
    downloaded, weights = resolve_adapter("someone/colours", allow_local=False)
    assert (downloaded / "adapter_config.json").is_file()
    assert not (downloaded / "adapter.safetensors").exists(), "the weights wait until the adapter is accepted"
    task, tiny = adapter_task("someone/colours")
    assert tiny and task.kind == "caption" and task.id == "adapter:someone/colours" and task.adapter == weights
    from_hub = pipe.caption(media_files["image"], adapter="someone/colours", preset="fast", max_new_tokens=4).text
    assert (downloaded / "adapter.safetensors").read_bytes() == (folder / "adapter.safetensors").read_bytes()
    assert from_hub == pipe.caption(media_files["image"], adapter=str(folder), preset="fast", max_new_tokens=4).text
    assert from_hub != pipe.caption(media_files["image"], "image-caption", preset="fast", max_new_tokens=4).text


def test_not_an_adapter(tmp_path, fake_hub):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="is not an adapter folder"):
        resolve_adapter(str(tmp_path / "empty"))
    with pytest.raises(WeightsUnavailable, match="someone/missing"):
        resolve_adapter("someone/missing")


def test_without_local_folders_a_source_is_only_ever_a_hub_repo(fake_hub, tmp_path, monkeypatch):
    """A public app does not read, nor say what exists on, its own disk: a folder named like a repo id is
    not looked at, and any other path is refused the same way whether or not it exists."""
    monkeypatch.chdir(tmp_path)
    folder = saved_tiny_adapter(tmp_path / "someone" / "colours", Pipeline(device="cpu", tiny=True))
    assert resolve_adapter("someone/colours") == (folder.resolve(), None)
    with pytest.raises(WeightsUnavailable, match=r"no adapter_config.json in someone/colours \(check the repo id you"):
        resolve_adapter("someone/colours", allow_local=False)
    for path in (str(folder), str(tmp_path / "nothing here")):
        with pytest.raises(AdapterError, match="is not a Hub repo id .*Local adapter folders are allowed only"):
            resolve_adapter(path, allow_local=False)
    with pytest.raises(AdapterError, match="neither an existing folder nor a Hub repo id"):
        resolve_adapter("some--one/colours")  # the Hub's own rules, not a network error


def test_a_refused_hub_adapter_never_downloads_its_weights(fake_hub, tmp_path):
    pipe = Pipeline(device="cpu", tiny=True)
    folder = saved_tiny_adapter(tmp_path / "mine", pipe)
    for name in ("adapter.safetensors", "adapter_config.json"):
        fake_hub.add("someone/refused", name, (folder / name).read_bytes())

    def refuse(task):
        raise AdapterError(f"not {task.kind} here")

    with pytest.raises(AdapterError, match="not caption here"):
        pipe.use_adapter("someone/refused", refuse)
    config_folder, _ = resolve_adapter("someone/refused", allow_local=False)
    assert not (config_folder / "adapter.safetensors").exists() and not pipe.is_adapter_served("someone/refused")

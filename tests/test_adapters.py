"""Trained adapters from a Hub repo (the loopback fake Hub) or a folder."""

from __future__ import annotations

import re

import pytest
import torch

from epalm.adapter_format import save_adapter
from epalm.adapters import read_adapter_config, resolve_adapter
from epalm.answers import Status
from epalm.errors import AdapterError, InputError, WeightsUnavailable
from epalm.pipeline import Pipeline
from epalm.tasks import AdapterConfig
from epalm.tiny import tiny_adapter


def saved_tiny_adapter(folder, pipe: Pipeline, task_id: str = "image-caption"):
    task = pipe.task(task_id)
    config = AdapterConfig(task, base_task=task.id, tiny=True)
    return save_adapter(tiny_adapter(task.injection, seed=7).state_dict(), config, "# card\n", folder)


def test_adapter_from_a_hub_repo_equals_the_same_folder(fake_hub, tmp_path, media_files):
    pipe = Pipeline(device="cpu", tiny=True)
    folder = saved_tiny_adapter(tmp_path / "mine", pipe)
    for name in ("adapter.safetensors", "adapter_config.json"):
        fake_hub.add("someone/colours", name, (folder / name).read_bytes())
    downloaded, weights = resolve_adapter("someone/colours", allow_local=False)
    assert (downloaded / "adapter_config.json").is_file()
    assert not (downloaded / "adapter.safetensors").exists(), "the weights wait until the adapter is accepted"
    config = read_adapter_config("someone/colours")
    task = config.task
    assert config.tiny and task.kind == "caption" and task.id == "adapter:someone/colours" and task.adapter == weights
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
        with pytest.raises(AdapterError, match="is not a Hub repo id .*; adapter folders on this machine are not"):
            resolve_adapter(path, allow_local=False)
    with pytest.raises(AdapterError, match="neither an existing folder nor a Hub repo id"):
        resolve_adapter("some--one/colours")  # the Hub's own rules, not a network error


def test_a_refused_hub_adapter_never_downloads_its_weights(fake_hub, tmp_path):
    pipe = Pipeline(device="cpu", tiny=True)
    folder = saved_tiny_adapter(tmp_path / "mine", pipe)
    for name in ("adapter.safetensors", "adapter_config.json"):
        fake_hub.add("someone/refused", name, (folder / name).read_bytes())

    with pytest.raises(AdapterError, match="trained for image captioning, not audio captioning"):
        pipe.use_adapter("someone/refused", "audio", "caption")
    config_folder, _ = resolve_adapter("someone/refused", allow_local=False)
    assert not (config_folder / "adapter.safetensors").exists() and not pipe.is_adapter_served("someone/refused")


def _set(config: dict, dotted: str, value: object) -> dict:
    """`config` with the value at `dotted` ("generation.num_beams") replaced (DELETE: removed)."""
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return config


DELETE = object()
# (what is changed in adapter_config.json, the value, what the refusal says): each names the field
MALFORMED = [
    ("preprocess.size", 3000, "preprocess.size must be a whole number from 16 to 1024, not 3000"),
    ("preprocess.size", 0, "preprocess.size must be a whole number from 16 to 1024, not 0"),
    ("preprocess.size", 112, "preprocess.size is 112, but its encoder"),
    ("preprocess.size", "224", "preprocess.size must be a whole number, not '224'"),
    ("preprocess.mean", [0.5, 0.5], "preprocess.mean must be a list of 3, not [0.5, 0.5]"),
    ("preprocess.std", [0.0, 1.0, 1.0], "preprocess.std must be a number from 1e-06 to 10, not 0.0"),
    ("preprocess.mean", [float("nan"), 0.5, 0.5], "preprocess.mean[0] must be a number, not nan"),
    ("text.prompt", "{0}", "text.prompt may hold {question} once and no other braces"),
    ("text.prompt", "{question", "text.prompt may hold {question} once and no other braces"),
    ("text.prompt", "{question.__class__.__mro__}{question}", "text.prompt may hold {question} once and no other"),
    ("text.prompt", "x" * 300, "text.prompt is 300 characters long; the limit is 200"),
    ("text.answer_token", "</b>", "answer_token '</b>' does not occur in the prompt"),
    ("text", "{question}", "text must be a mapping"),
    ("injection.start_layer", 100, "need start_layer < end_layer"),
    ("injection.end_layer", 1000, "injection.end_layer must be a whole number from 1 to 128, not 1000"),
    ("injection.end_layer", 100, "injection.end_layer is 100, but"),
    ("injection.num_features", 0, "injection.num_features must be a whole number from 1 to 128, not 0"),
    ("injection.num_features", 50, "injection.num_features is 50, but"),
    ("injection.prompt_mlp", "yes", "injection.prompt_mlp must be true or false, not 'yes'"),
    ("generation.num_beams", 2000, "generation.num_beams must be a whole number from 1 to 8, not 2000"),
    ("generation.max_length", 10**9, "generation.max_length must be a whole number from 1 to 512"),
    ("generation.num_beams", True, "generation.num_beams must be a whole number, not True"),
    ("generation.bogus", 1, "generation has no setting 'bogus'"),
    ("lm", DELETE, "lm must be a mapping"),
    ("lm.id", "x" * 500, "lm.id is 500 characters long; the limit is 200"),
    ("modality", "smell", "modality must be one of image, video, audio"),
    ("title", "bell\u0007", "title must be printable text"),
    ("title", "\ud800", "title must be printable text"),
    ("encoder.config", {"x": [1, 2]}, "encoder.config.x must be text, not [1, 2]"),
    ("tiny", "yes", "tiny must be true or false, not 'yes'"),
]


@pytest.mark.parametrize("where", ["folder", "hub"])
def test_a_malformed_adapter_config_is_refused_naming_its_field(fake_hub, tmp_path, media_files, where):
    """A user's adapter config is untrusted input: every bad value is refused in words that name its field,
    before anything runs, through the Python API (the app's table is in test_app_security)."""
    import json

    pipe = Pipeline(device="cpu", tiny=True)
    folder = saved_tiny_adapter(tmp_path / "good", pipe)
    good = json.loads((folder / "adapter_config.json").read_text())
    for number, (field, value, message) in enumerate(MALFORMED):
        config = _set(json.loads(json.dumps(good)), field, value)
        bad = tmp_path / f"bad{number}"
        bad.mkdir()
        (bad / "adapter.safetensors").write_bytes((folder / "adapter.safetensors").read_bytes())
        (bad / "adapter_config.json").write_text(json.dumps(config))
        source = str(bad)
        if where == "hub":
            source = f"someone/bad{number}"
            for name in ("adapter.safetensors", "adapter_config.json"):
                fake_hub.add(source, name, (bad / name).read_bytes())
        with pytest.raises(AdapterError) as refused:
            pipe.caption(media_files["image"], adapter=source, preset="fast", max_new_tokens=2)
            pytest.fail(f"accepted {field} = {value!r}")
        assert message in str(refused.value), (field, value, str(refused.value))
        assert not pipe.is_adapter_served(source)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "adapter_config.json is not readable JSON"),
        (b"[1, 2]", "adapter_config.json must hold a JSON object"),
        (b"\xff\xfe", "adapter_config.json is not readable JSON"),
        (b"{" + b" " * (2 << 20) + b"}", "adapter_config.json is not readable JSON (larger than 1024 KB)"),
    ],
)
def test_an_unreadable_adapter_config_is_refused(tmp_path, content, message):
    folder = saved_tiny_adapter(tmp_path / "unreadable", Pipeline(device="cpu", tiny=True))
    (folder / "adapter_config.json").write_bytes(content)
    with pytest.raises(AdapterError, match=re.escape(message)):
        read_adapter_config(str(folder))


@pytest.mark.parametrize("name", ["a" * 200, "someone/" + "b" * 200, "/" + "c" * 300 + "/adapter", "x/" * 3000])
def test_an_overlong_adapter_name_is_refused_without_being_echoed(tmp_path, name):
    pipe = Pipeline(device="cpu", tiny=True)
    with pytest.raises(AdapterError) as refused:
        pipe.use_adapter(name)
    assert len(str(refused.value)) < 200 and "Errno" not in str(refused.value)


def test_the_question_is_plain_text_in_the_prompt(tmp_path):
    from epalm.tasks import TextFormat

    text = TextFormat("{question}?</a>", "</a>", question_mark=True)
    assert text.render("{question.__class__.__mro__} {0} {}") == "{question.__class__.__mro__} {0} {}??</a>"


def _publish(fake_hub, repo: str, folder) -> None:
    for name in ("adapter.safetensors", "adapter_config.json"):
        fake_hub.add(repo, name, (folder / name).read_bytes())


def _other_weights(folder, seed: int) -> None:
    """Retrain in place, as it were: the same adapter folder with other weights."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "adapter.safetensors")
    generator = torch.Generator().manual_seed(seed)
    save_file({k: torch.randn(v.shape, generator=generator) for k, v in state.items()}, folder / "adapter.safetensors")


def test_a_retrained_folder_is_served_with_its_new_weights_however_it_is_spelled(tmp_path, media_files, monkeypatch):
    pipe = Pipeline(device="cpu", tiny=True)
    folder = saved_tiny_adapter(tmp_path / "runs" / "b1", pipe)
    monkeypatch.chdir(tmp_path)
    settings = dict(preset="fast", max_new_tokens=6)
    before = pipe.caption(media_files["image"], adapter="runs/b1", **settings)
    assert pipe.caption(media_files["image"], adapter="./runs/b1/", **settings).task == before.task
    assert before.task == f"adapter:{folder.resolve()}" and len(pipe.users) == 1, "one adapter, however spelled"
    _other_weights(folder, seed=3)
    after = pipe.caption(media_files["image"], adapter=str(folder), **settings).text
    assert after != before.text
    assert (
        after == Pipeline(device="cpu", tiny=True).caption(media_files["image"], adapter=str(folder), **settings).text
    )


def test_a_re_pushed_hub_adapter_is_served_as_its_branch_is_now(fake_hub, tmp_path, media_files):
    pipe = Pipeline(device="cpu", tiny=True)
    pipe.users.recheck_s = 0  # ask the Hub every time (by default at most once a minute)
    folder = saved_tiny_adapter(tmp_path / "mine", pipe)
    _publish(fake_hub, "someone/moving", folder)
    settings = dict(preset="fast", max_new_tokens=6)
    before = pipe.caption(media_files["image"], adapter="someone/moving", **settings).text
    _other_weights(folder, seed=4)
    fake_hub.commit = "fedcba9876543210fedcba9876543210fedcba98"  # the branch moves to a new commit
    _publish(fake_hub, "someone/moving", folder)
    after = pipe.caption(media_files["image"], adapter="someone/moving", **settings).text
    assert after != before and after == pipe.caption(media_files["image"], adapter=str(folder), **settings).text
    assert f"/someone/moving/resolve/{fake_hub.commit}/adapter.safetensors" in fake_hub.downloads


def test_a_hub_that_does_not_answer_leaves_a_served_adapter_as_it_is(fake_hub, tmp_path, media_files, monkeypatch):
    """A failed check of the branch (a timeout, a 5xx, offline) is no new commit: the adapter is not read
    again nor unloaded (it was, and again once the Hub answered)."""
    import epalm.adapters

    pipe = Pipeline(device="cpu", tiny=True)
    pipe.users.recheck_s = 0
    folder = saved_tiny_adapter(tmp_path / "mine", pipe)
    _publish(fake_hub, "someone/steady", folder)
    settings = dict(preset="fast", max_new_tokens=6)
    before = pipe.caption(media_files["image"], adapter="someone/steady", **settings).text
    unloaded = []
    monkeypatch.setattr(pipe.users, "unload", unloaded.append)
    with monkeypatch.context() as blip:
        blip.setattr(epalm.adapters, "remote", lambda *args: None)  # the Hub does not answer
        assert pipe.caption(media_files["image"], adapter="someone/steady", **settings).text == before
    assert pipe.caption(media_files["image"], adapter="someone/steady", **settings).text == before
    assert unloaded == [], "served as it was, through the blip and after it"


def test_users_adapters_are_bounded_and_a_full_house_is_busy_not_bigger(fake_hub, tmp_path, media_files):
    from epalm.adapters import Busy

    pipe = Pipeline(device="cpu", tiny=True)
    pipe.users.max_count = 2
    folder = saved_tiny_adapter(tmp_path / "mine", pipe)
    for name in ("a", "b", "c"):
        _publish(fake_hub, f"someone/{name}", folder)
    settings = dict(preset="fast", max_new_tokens=2)
    for name in ("a", "b", "c"):  # the least recently used one is unloaded for the third
        pipe.caption(media_files["image"], adapter=f"someone/{name}", **settings)
    assert len(pipe.users) == 2 and not pipe.is_adapter_served("someone/a")
    assert sum("adapter:" in name for name in pipe.loaded()) == 2, "its weights left memory too"
    held = [pipe.stream(media_files["image"], None, adapter=f"someone/{name}", **settings) for name in ("b", "c")]
    for stream in held:  # two answers under way, holding both places
        next(event for event in stream if isinstance(event, Status) and event.stage == "encoding")
    with pytest.raises(Busy, match="busy with other adapters right now; please try again"):
        pipe.caption(media_files["image"], adapter="someone/a", **settings)
    for stream in held:
        stream.close()
    assert pipe.caption(media_files["image"], adapter="someone/a", **settings).done


def test_a_served_adapter_is_held_until_its_request_ends_and_refusals_hold_nothing(fake_hub, tmp_path, media_files):
    """Between an adapter's serving and its request's start, another visitor's adapter cannot unload it;
    a request refused after its adapter was served lets go of it."""
    from epalm.adapters import Busy

    pipe = Pipeline(device="cpu", tiny=True)
    pipe.users.max_count = 1
    folder = saved_tiny_adapter(tmp_path / "mine", pipe)
    for name in ("a", "b"):
        _publish(fake_hub, f"someone/{name}", folder)
    task = pipe.users.serve("someone/a", False, lambda config: None)  # served; its request has not begun yet
    with pytest.raises(Busy):
        pipe.users.serve("someone/b", False, lambda config: None)
    pipe.users.release(task.id)
    settings = dict(preset="fast", max_new_tokens=2)
    with pytest.raises(InputError, match="Please upload"):  # refused after its adapter was served
        pipe.caption(None, adapter="someone/b", **settings)
    with pytest.raises(AdapterError, match="trained for image captioning, not audio"):  # this caller's rules
        next(pipe.stream(media_files["audio"], None, adapter="someone/b", modality="audio", **settings))
    pipe.use_adapter("someone/b")
    assert pipe.caption(media_files["image"], adapter="someone/a", **settings).done, "nothing is left held"
    assert not pipe.is_adapter_served("someone/b")


def test_hub_adapter_weights_over_the_limit_are_refused_before_they_download(fake_hub, tmp_path, media_files):
    pipe = Pipeline(device="cpu", tiny=True)
    folder = saved_tiny_adapter(tmp_path / "mine", pipe)
    _publish(fake_hub, "someone/big", folder)
    pipe.users.max_download = 1000
    with pytest.raises(AdapterError, match=r"someone/big's weights are \d+ KiB; this app takes adapters of up to"):
        pipe.caption(media_files["image"], adapter="someone/big")
    assert not any(path.endswith("adapter.safetensors") for path in fake_hub.downloads)

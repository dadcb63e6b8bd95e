"""The adapter's files: the authors' checkpoints (pickles refused if they run code), our format, conversion."""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import replace

import pytest
import torch

from epalm.adapter_format import ENCODER_SHAPES, LM_SHAPES, convert, load_adapter, read_adapter
from epalm.errors import AdapterError
from epalm.model import Adapter
from epalm.parity import load_case
from epalm.refs import ADAPTER_CONFIG, EncoderRef, ModelRef
from epalm.tasks import load_registry

from conftest import PARITY_CASES, save_numpy1_checkpoint


def fixture_task(case):
    """A registry task whose injection and models are the fixture's (the adapter file is the fixture's): its
    LM and encoder are none of the registry's, so `convert` checks the file against its own widths."""
    manifest, lm, encoder, adapter = load_case(case)
    task = replace(
        load_registry()["image-caption"],
        id=f"fixture-{case.name}",
        injection=adapter.config,
        lm=ModelRef("test/fixture-opt"),
        encoder=EncoderRef("timm", "fixture-vit"),
    )
    return task, lm, encoder, adapter


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
    with pytest.raises(AdapterError, match=r"not a readable PyTorch checkpoint \(truncated, or not a checkpoint: \w"):
        read_adapter(tmp_path / "bad.pth")


def test_what_is_not_a_checkpoint_file_is_said_with_a_reason(tmp_path):
    """Empty, missing, a device, a pipe (which a reader would wait on forever), a folder without
    weights, a truncated zip: each message says what the path is or why it cannot be read."""
    (tmp_path / "empty.pth").write_bytes(b"")
    os.mkfifo(tmp_path / "pipe.pth")
    (tmp_path / "folder").mkdir()
    torch.save({"model": {"connector.0.weight": torch.zeros(64, 64)}}, tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:300])
    for path, message in [
        (tmp_path / "empty.pth", r"empty.pth is empty \(0 bytes\): not a checkpoint\."),
        (tmp_path / "missing.pth", r"No such file: .*missing.pth"),
        ("/dev/zero", r"/dev/zero is a character device, not a checkpoint file\."),
        (tmp_path / "pipe.pth", r"pipe.pth is a named pipe, not a checkpoint file\."),
        (tmp_path / "folder", r"folder is a folder without adapter.safetensors"),
        (tmp_path / "cut.pth", r"cut.pth is not a readable PyTorch checkpoint \(\w.{5,}\)\.$"),
    ]:
        with pytest.raises(AdapterError, match=message):
            read_adapter(path)


@pytest.mark.parametrize("fmt", ["plain pickle", "legacy torch.save"])
def test_a_legacy_pickle_that_calls_system_is_named(tmp_path, fmt):
    """Pickles outside torch's zip format (a bare pickle, the pre-1.6 format): torch refuses them before
    naming the global; the refusal still names it (read from the pickle's instructions, never run)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint_best.pth"
    payload = {"model": {"connector.0.weight": torch.zeros(2, 2)}, "x": _System(f"touch {marker}")}
    if fmt == "plain pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    with pytest.raises(
        AdapterError, match=r"Refused to load checkpoint_best.pth: it asks to run Python code \(posix\.system\)"
    ):
        read_adapter(path)
    assert not marker.exists()
    torch.save({"model": {"connector.0.weight": torch.ones(2)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_adapter(path)["connector.0.weight"], torch.ones(2)), "a legacy checkpoint of tensors loads"


def real_shaped(task_id: str = "image-caption-L") -> dict[str, torch.Tensor]:
    """An adapter state at a registry task's real shapes (ViT-L/16 into OPT-6.7B: one shared connector,
    4.2 M weights), from the widths table."""
    task = load_registry()[task_id]
    encoder, (hidden, embed, _) = ENCODER_SHAPES[task.encoder.id][0], LM_SHAPES[task.lm.id]
    return {k: v.clone() for k, v in Adapter(task.injection, encoder, hidden, embed).state_dict().items()}


def test_convert_checks_the_tensors_against_the_tasks_models(tmp_path):
    """A checkpoint is converted only when it is the task's adapter: the widths of the task's models
    (known for the registry's models without downloading them), every key, finite numbers."""
    registry = load_registry()
    state = real_shaped()
    torch.save({"model": state}, tmp_path / "good.pth")
    out = convert(tmp_path / "good.pth", registry["image-caption-L"], tmp_path / "good")
    assert read_adapter(out).keys() == state.keys()
    fixture = PARITY_CASES[0] / "adapters.pth"
    refused = [
        (
            fixture,
            "image-caption",
            r"adapters.pth does not fit the task 'image-caption': its tensors are for a "
            r"\d+-wide encoder and a \d+-wide language model, but ViT-B/16 is 768 wide and OPT-2.7B 2560\.",
        ),
        (tmp_path / "good.pth", "image-caption", r"for a 1024-wide encoder and a 4096-wide language model"),
    ]
    nan = dict(state, **{"connector.0.bias": torch.full_like(state["connector.0.bias"], float("nan"))})
    torch.save({"model": nan}, tmp_path / "nan.pth")
    refused.append((tmp_path / "nan.pth", "image-caption-L", r"connector\.0\.bias holds NaN or infinite values"))
    torch.save({"model": {k: v for k, v in state.items() if k != "connector.0.bias"}}, tmp_path / "part.pth")
    refused.append((tmp_path / "part.pth", "image-caption-L", r"missing keys \['connector\.0\.bias'\]"))
    torch.save({"model": {}, "epoch": 3}, tmp_path / "none.pth")
    refused.append((tmp_path / "none.pth", "image-caption-L", r"none.pth holds no adapter tensors"))
    for path, task_id, message in refused:
        with pytest.raises(AdapterError, match=message):
            convert(path, registry[task_id], tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written for a refused checkpoint"
    deep = replace(registry["image-caption-L"], injection=replace(registry["image-caption-L"].injection, end_layer=40))
    with pytest.raises(AdapterError, match="injection.end_layer is 40, but OPT-6.7B has 32 layers"):
        convert(tmp_path / "good.pth", deep, tmp_path / "out")


def test_the_widths_table_covers_the_registry_and_matches_timm():
    """Every registry model has its widths in the table (a model added without them would convert
    unchecked); timm's definitions of the ViTs, built on the meta device, agree with them."""
    import timm

    for task in load_registry().values():
        assert task.lm.id in LM_SHAPES and task.encoder.id in ENCODER_SHAPES, task.id
    for name, (width, blocks) in ENCODER_SHAPES.items():
        if name.startswith("vit_"):
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
            assert (model.embed_dim, len(model.blocks)) == (width, blocks), name


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.to(torch.int32), "holds torch.int32 values, not numbers"),
        (lambda t: t.fill_(float("nan")), "holds NaN or infinite values"),
    ],
    ids=["integers", "nan"],
)
def test_tensors_that_are_not_finite_numbers_are_refused(change, message):
    task, _, encoder, adapter = fixture_task(PARITY_CASES[0])
    state = {key: tensor.clone() for key, tensor in adapter.state_dict().items()}
    key = sorted(state)[0]
    state[key] = change(state[key])
    with pytest.raises(AdapterError, match=f"{re.escape(key)} {message}"):
        load_adapter(task, state, encoder.dim, adapter.connector[0].out_features, adapter.prompt(1).shape[-1])

"""The adapter's files: the authors' checkpoints (pickles refused if they run code), our format, conversion."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace

import pytest
import torch

from epalm.adapter_format import convert, load_adapter, read_adapter
from epalm.errors import AdapterError
from epalm.parity import load_case
from epalm.refs import ADAPTER_CONFIG
from epalm.tasks import load_registry

from conftest import PARITY_CASES, save_numpy1_checkpoint


def fixture_task(case):
    """A registry task whose injection is the fixture's (the adapter file is the fixture's)."""
    manifest, lm, encoder, adapter = load_case(case)
    task = replace(load_registry()["image-caption"], id=f"fixture-{case.name}", injection=adapter.config)
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
    with pytest.raises(AdapterError, match="not a readable PyTorch checkpoint"):
        read_adapter(tmp_path / "bad.pth")


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

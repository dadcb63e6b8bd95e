"""The reference fixtures made with the original eP-ALM code, checked end to end."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from epalm.decoding import DecodingOptions
from epalm.engine import generate
from epalm.parity import encoder_input, load_case, main, run_case

from conftest import PARITY_CASES, PARITY_DIR
from test_model import run_capturing


def test_parity_command_passes_on_every_case(parity_cases, capsys):
    """The command as the README gives it (a folder of cases), plus the extra cases and a stray file."""
    extra = [str(case) for case in parity_cases if case.parent != PARITY_DIR]
    assert main([str(PARITY_DIR), *extra, str(PARITY_DIR / "README.md")]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert lines and all(line.startswith("PASS") for line in lines) and out.rstrip().endswith("all checks passed")
    for case in parity_cases:  # every case printed its feature, logits and generation checks
        names = {line.split()[2] for line in lines if line.split()[1] == case.name}
        assert {"cls_features", "projected", "prompt_embeds", "logits", "greedy_ids", "beam3_ids"} <= names


def test_parity_fails_when_an_adapter_weight_is_off(tmp_path, parity_cases):
    case = shutil.copytree(parity_cases[0], tmp_path / parity_cases[0].name)
    state = torch.load(case / "adapters.pth", weights_only=True)
    state["model"]["connector.0.weight"] += 0.1 * torch.randn_like(state["model"]["connector.0.weight"])
    torch.save(state, case / "adapters.pth")
    failed = [c.name for c in run_case(case) if not c.passed]
    assert "projected" in failed and "logits" in failed
    assert main([str(case)]) == 1


def test_parity_reports_a_directory_without_manifest(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no manifest.json" in capsys.readouterr().out


def test_parity_without_any_case_fails(tmp_path, capsys):
    """Only files (a shell glob that matched no case folder): an error, not "all checks passed"."""
    stray = tmp_path / "README.md"
    stray.write_text("not a case")
    assert main([str(stray)]) == 2
    captured = capsys.readouterr()
    assert "no case directory" in captured.err and "passed" not in captured.out


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda p: p.name)
def test_layer_inputs_and_masks_match_the_original(case):
    """Every decoder layer's input (after injection) and the 4-D masks equal the original's."""
    manifest, lm, encoder, adapter = load_case(case)
    inputs, debug = load_file(case / "inputs.safetensors"), load_file(case / "debug.safetensors")
    with torch.inference_mode():
        prefix = adapter.prefix(encoder(encoder_input(manifest, inputs), adapter.config.num_features))
    _, seen = run_capturing(lm, inputs["input_ids"], inputs["attention_mask"], prefix)
    for i, (hidden, mask) in seen.items():
        torch.testing.assert_close(hidden, debug[f"decoder_layer_input.{i}"], atol=2e-5, rtol=0)
        if f"decoder_additive_mask.{i}" in debug:
            want = debug[f"decoder_additive_mask.{i}"]
            assert torch.equal(mask == 0, want == 0), f"layer {i}: attended positions differ"


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda p: p.name)
def test_a_raised_length_limit_keeps_every_answer_that_ended_before_the_original_one(case):
    """`min_answer_tokens` raises max_length for long prompts; where the original's decode ended
    (EOS, or a finished beam search) before its limit, the ids are still the original's."""
    manifest, lm, encoder, adapter = load_case(case)
    inputs, expected = load_file(case / "inputs.safetensors"), load_file(case / "expected.safetensors")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ended_early = [spec for spec in manifest["generation"] if expected[spec["key"]].shape[1] < spec["max_length"]]
    assert ended_early, "the fixtures hold decodes that end on EOS"
    with torch.inference_mode():
        prefix = adapter.prefix(encoder(encoder_input(manifest, inputs), adapter.config.num_features))
        for spec in ended_early:
            options = DecodingOptions(
                num_beams=spec["num_beams"],
                max_length=spec["max_length"],
                min_answer_tokens=spec["max_length"],
                eos_token_id=spec["eos_token_id"],
                pad_token_id=spec["pad_token_id"],
            )
            assert options.extends_limit(ids.shape[1])
            assert torch.equal(generate(lm, prefix, ids, mask, options).sequences, expected[spec["key"]]), spec["key"]

"""Check this implementation against fixtures made with the original eP-ALM code.

    python -m epalm.parity DIR [DIR ...]

Each DIR holds a case in the format of tests/fixtures/parity/README.md (manifest.json, weights,
inputs, expected outputs), or is a folder of such cases. Everything is read from the manifest; one
line is printed per check and the exit status is 0 only when at least one case ran and every check
of every case passed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import OPTConfig, OPTForCausalLM

from .decoding import DecodingOptions
from .encoders import Encoder, build_encoder
from .engine import generate
from .model import EPALM, Adapter, InjectionConfig

FEATURE_TOLERANCE = 1e-5
LOGITS_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-4


@dataclass
class Check:
    case: str
    name: str
    passed: bool
    detail: str

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.case:<16} {self.name:<28} {self.detail}"


def load_lm(config: dict, weights: Path) -> OPTForCausalLM:
    """OPT from config kwargs and `OPTForCausalLM` weights whose lm_head is tied (not stored)."""
    lm = OPTForCausalLM(OPTConfig(**config, attn_implementation="eager"))
    missing, unexpected = lm.load_state_dict(load_file(weights), strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise ValueError(f"{weights}: missing {missing}, unexpected {unexpected}")
    lm.tie_weights()
    return lm.eval()


def load_case(case_dir: Path) -> tuple[dict, EPALM, Encoder, Adapter]:
    manifest = json.loads((case_dir / "manifest.json").read_text())
    lm = EPALM(load_lm(manifest["lm_config"], case_dir / "lm.safetensors"))
    spec = manifest["encoder"]
    encoder = build_encoder(spec["library"], spec["class"], spec["config"])
    encoder.model.load_state_dict(load_file(case_dir / spec.get("weights", "encoder.safetensors")), strict=True)
    epalm = manifest["epalm"]
    injection = InjectionConfig(
        start_layer=epalm["start_layer_idx"],
        end_layer=epalm["end_layer_idx"],
        num_features=epalm["injected_hidden_states"],
        shared_connector=bool(epalm["shared_connector"]),
        prompt_len=epalm["prompt_len"],
        prompt_mlp=bool(epalm["prompt_mlp"]),
    )
    adapter = Adapter(injection, encoder.dim, lm.config.hidden_size, lm.config.word_embed_proj_dim)
    state = torch.load(case_dir / manifest.get("adapters", {}).get("file", "adapters.pth"), weights_only=True)["model"]
    adapter.load_state_dict(state, strict=True)
    return manifest, lm, encoder.eval(), adapter.eval()


def encoder_input(manifest: dict, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    key = manifest["inputs"]["encoder_input_key"]
    x = inputs[key]
    if key == "video":  # fixtures keep the original [B, 3, T, H, W]; TimesformerModel wants [B, T, 3, H, W]
        x = x.permute(0, 2, 1, 3, 4)
    return x


def _close(case: str, name: str, ours: torch.Tensor, expected: torch.Tensor, tolerance: float) -> Check:
    if ours.shape != expected.shape:
        return Check(case, name, False, f"shape {tuple(ours.shape)} != expected {tuple(expected.shape)}")
    diff = (ours.float() - expected.float()).abs().max().item()
    return Check(case, name, diff <= tolerance, f"max abs diff {diff:.2e} (tol {tolerance:.0e})")


def run_case(case_dir: Path) -> list[Check]:
    """Every check of one fixture directory."""
    case = case_dir.name
    manifest, lm, encoder, adapter = load_case(case_dir)
    inputs = load_file(case_dir / manifest["inputs"].get("file", "inputs.safetensors"))
    expected = load_file(case_dir / manifest["expected"].get("file", "expected.safetensors"))
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.inference_mode():
        features = encoder(encoder_input(manifest, inputs), adapter.config.num_features)
        prefix = adapter.prefix(features)
        logits = lm(input_ids, attention_mask, prefix)
        checks = [
            _close(case, "cls_features", features, expected["cls_features"], FEATURE_TOLERANCE),
            _close(case, "projected", prefix.visual, expected["projected"], FEATURE_TOLERANCE),
            _close(case, "prompt_embeds", prefix.prompt, expected["prompt_embeds"], FEATURE_TOLERANCE),
            _close(case, "logits", logits, expected["logits"], LOGITS_TOLERANCE),
        ]
        for spec in manifest["generation"]:
            options = DecodingOptions(
                num_beams=spec["num_beams"],
                do_sample=spec.get("do_sample", False),
                max_length=spec["max_length"],
                eos_token_id=spec["eos_token_id"],
                pad_token_id=spec["pad_token_id"],
                length_penalty=spec.get("length_penalty", 1.0),
            )
            out = generate(lm, prefix, input_ids, attention_mask, options)
            want = expected[spec["key"]]
            same = out.sequences.shape == want.shape and torch.equal(out.sequences, want)
            detail = "ids identical" if same else f"ids differ: got {out.sequences.tolist()} expected {want.tolist()}"
            checks.append(Check(case, spec["key"], same, f"{detail} {tuple(want.shape)}"))
            if "sequence_scores_key" in spec and out.sequence_scores is not None:
                key = spec["sequence_scores_key"]
                checks.append(_close(case, key, out.sequence_scores, expected[key], SCORE_TOLERANCE))
    return checks


def _case_dirs(paths: list[Path]) -> list[Path]:
    """The paths as given, with a folder of cases (no manifest.json of its own) replaced by its cases."""
    out = []
    for path in paths:
        inner = [] if (path / "manifest.json").is_file() else sorted(path.glob("*/manifest.json"))
        out += [m.parent for m in inner] or [path]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epalm.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", type=Path, help="case folders (with a manifest.json) or folders of cases")
    args = parser.parse_args(argv)
    failures = ran = 0
    for case_dir in _case_dirs(args.cases):
        if case_dir.is_file():  # e.g. the README.md that `tests/fixtures/parity/*` also expands to
            print(f"skip  {case_dir}: not a case directory")
            continue
        if not (case_dir / "manifest.json").is_file():
            print(f"FAIL  {case_dir}: no manifest.json here")
            failures += 1
            continue
        ran += 1
        try:
            checks = run_case(case_dir)
        except Exception as exc:  # a broken case is a failed case, and the others still run
            print(f"FAIL  {case_dir.name}: could not run: {type(exc).__name__}: {exc}")
            failures += 1
            continue
        for check in checks:
            print(check)
        failures += sum(not c.passed for c in checks)
    if not ran and not failures:
        print("error: no case directory among the arguments (a case is a folder with a manifest.json)", file=sys.stderr)
        return 2
    print(f"{'all checks passed' if not failures else f'{failures} check(s) failed'}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())

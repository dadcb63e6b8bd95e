"""Shared fixtures: the reference parity cases and tiny random models (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from epalm.model import EPALM
from epalm.tiny import tiny_adapter, tiny_encoder, tiny_lm, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EPALM_SHARED", ROOT.parent / "shared"))
PARITY_CASES = sorted(p for p in (SHARED / "parity").glob("*") if (p / "manifest.json").is_file())

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def parity_cases() -> list[Path]:
    assert PARITY_CASES, f"no parity fixtures under {SHARED / 'parity'} (set EPALM_SHARED)"
    return PARITY_CASES


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_model() -> EPALM:
    return EPALM(tiny_lm(seed=0))


@pytest.fixture(scope="session", params=["image", "video", "audio"])
def tiny_encoder_model(request):
    return tiny_encoder(request.param, seed=0)


@pytest.fixture(scope="session")
def tiny_image_adapter(tiny_lm_model):
    return tiny_adapter(tiny_encoder("image"), tiny_lm_model.lm)

"""Encoder [CLS] features: the original's per-block final-LayerNorm outputs, per modality."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from epalm.encoders import build_encoder, wrap_encoder
from epalm.parity import encoder_input, load_case
from epalm.tiny import tiny_encoder

from conftest import PARITY_CASES


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda p: p.name)
def test_features_match_the_original_blocks(case):
    manifest, _, encoder, adapter = load_case(case)
    inputs, debug = load_file(case / "inputs.safetensors"), load_file(case / "debug.safetensors")
    x = encoder_input(manifest, inputs)
    depth = encoder.depth
    with torch.inference_mode():
        every_block = encoder(x, depth)
    want = torch.stack([debug[f"encoder_normed_block_output.{i}"][:, 0] for i in range(depth)])
    torch.testing.assert_close(every_block, want, atol=1e-5, rtol=0)
    assert every_block.shape[0] == depth and manifest["modality"] == encoder.modality


@pytest.mark.parametrize(
    "modality, shape", [("image", (2, 3, 224, 224)), ("video", (2, 8, 3, 224, 224)), ("audio", (2, 1024, 128))]
)
def test_tiny_encoders_take_real_input_sizes(modality, shape):
    encoder = tiny_encoder(modality)
    with torch.inference_mode():
        feats = encoder(torch.randn(shape), 3)
    assert feats.shape == (3, 2, encoder.dim)
    with pytest.raises(ValueError):
        encoder(torch.randn(shape), encoder.depth + 1)


def test_video_frame_count_follows_the_input():
    """The time embedding is resized (nearest) to the frames fed, and the layers use that count."""
    encoder = tiny_encoder("video")
    with torch.inference_mode():
        eight = encoder(torch.randn(1, 8, 3, 224, 224), 2)
        sixteen = encoder(torch.randn(1, 16, 3, 224, 224), 2)
        # a model whose stored time embedding already has 16 rows (each repeated) gives the same
        clone = tiny_encoder("video")
        clone.model.embeddings.time_embeddings.data = clone.model.embeddings.time_embeddings.repeat_interleave(2, dim=1)
        video = torch.randn(1, 16, 3, 224, 224)
        torch.testing.assert_close(encoder(video, 2), clone(video, 2))
    assert eight.shape == sixteen.shape == (2, 1, encoder.dim)


def test_unknown_encoders_are_refused():
    with pytest.raises(TypeError):
        wrap_encoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):
        build_encoder("keras", "X", {})


def test_encoders_use_the_fused_attention_where_the_library_has_it():
    """AST has transformers' SDPA attention: the same features as the eager one to float rounding.
    TimeSformer has none and stays eager."""
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    fused = build_encoder("transformers", "ASTModel", config)
    eager = build_encoder("transformers", "ASTModel", config)
    eager.model.config._attn_implementation = "eager"
    eager.load_state_dict(fused.state_dict())
    assert fused.model.config._attn_implementation == "sdpa"
    fbank = torch.randn(1, 1024, 128)
    with torch.inference_mode():
        torch.testing.assert_close(fused(fbank, 2), eager(fbank, 2), atol=1e-5, rtol=0)
    video = build_encoder("transformers", "TimesformerModel", dict(config, patch_size=32))
    assert video.model.config._attn_implementation == "eager"

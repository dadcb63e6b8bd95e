"""Encoder [CLS] features: the original's per-block final-LayerNorm outputs, per modality."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from epalm.encoders import FeatureCache, build_encoder, wrap_encoder
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


def _inputs(seed: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 224, 224, generator=generator) for _ in range(count)]


def test_feature_cache_encodes_each_input_once(encoder_calls):
    encoder, other = tiny_encoder("image"), tiny_encoder("image", seed=1)
    calls, other_calls = encoder_calls(encoder), encoder_calls(other)
    cache = FeatureCache(8)
    a, b = _inputs(0, 2)
    with torch.inference_mode():
        alone = encoder(torch.stack([a, b]), 3)
        calls.clear()
        first, hits = cache.encode(encoder, [a], 3)
        assert hits == [False] and calls == [1]
        torch.testing.assert_close(first, alone[:, :1])
        again, hits = cache.encode(encoder, [a.clone(), b, b.clone()], 3)  # equal bytes: one entry
        assert hits == [True, False, False] and calls == [1, 1], "b encoded once, a not again"
        torch.testing.assert_close(again, alone[:, [0, 1, 1]])
        assert torch.equal(again[:, 0], first[:, 0])
        cache.encode(encoder, [a], 2)  # other blocks, other encoder, other dtype: other features
        cache.encode(other, [a], 3)
        cache.encode(encoder, [a.double()], 3)
        assert calls == [1, 1, 1, 1] and other_calls == [1] and len(cache) == 5


def test_feature_cache_drops_the_least_recently_used_and_owns_its_tensors(encoder_calls):
    encoder = tiny_encoder("image")
    calls = encoder_calls(encoder)
    cache = FeatureCache(2)
    a, b, c = _inputs(1, 3)
    with torch.inference_mode():
        cache.encode(encoder, [a], 3)
        cache.encode(encoder, [b], 3)
        cache.encode(encoder, [a], 3)  # a is now the most recent
        cache.encode(encoder, [c], 3)  # evicts b
        assert len(cache) == 2 and calls == [1, 1, 1]
        kept, hits = cache.encode(encoder, [a, b], 3)
        assert hits == [True, False] and calls == [1, 1, 1, 1]
        torch.testing.assert_close(kept[:, 0], encoder(a[None], 3)[:, 0])
        assert all(entry._base is None for entry in cache._entries.values()), "no entry is a view of a batch"


def test_feature_cache_of_size_zero_keeps_nothing(encoder_calls):
    encoder = tiny_encoder("image")
    calls = encoder_calls(encoder)
    cache = FeatureCache(0)
    (a,) = _inputs(2, 1)
    with torch.inference_mode():
        for _ in range(2):
            assert cache.encode(encoder, [a, a], 3)[1] == [False, False]
    assert calls == [2, 2] and len(cache) == 0
    with pytest.raises(ValueError, match="0 \\(off\\) or more"):
        FeatureCache(-1)

"""Encoder [CLS] features: the original's per-block final-LayerNorm outputs, per modality."""

from __future__ import annotations

import threading
import time

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
        first, hit = cache.features(encoder, a, 3)
        assert not hit and calls == [1]
        torch.testing.assert_close(first, alone[:, 0])
        again, hit = cache.features(encoder, a.clone(), 3)  # equal bytes: the same entry
        assert hit and calls == [1] and torch.equal(again, first)
        torch.testing.assert_close(cache.features(encoder, b, 3)[0], alone[:, 1])
        cache.features(encoder, a, 2)  # other blocks, other encoder, other dtype: other features
        cache.features(other, a, 3)
        cache.features(encoder, a.double(), 3)
        assert calls == [1, 1, 1, 1] and other_calls == [1] and len(cache) == 5


def test_inputs_waiting_for_one_encoder_are_encoded_together_by_one_of_their_threads(encoder_calls):
    """While the encoder runs for one request, the others that want it queue up; the next of their threads
    to take the encoder runs it once for all of them (each distinct input once), on its own thread."""
    encoder = tiny_encoder("image")
    calls = encoder_calls(encoder)
    running, release = threading.Event(), threading.Event()
    forward = encoder.forward

    def held(x, num_blocks):  # the first call holds the encoder until the others wait for it
        running.set()
        assert release.wait(10)
        return forward(x, num_blocks)

    encoder.forward = held
    cache = FeatureCache(8)
    first, *rest = _inputs(3, 4)
    inputs = [first, *rest, rest[0].clone()]  # the last two are the same bytes
    results: dict[int, tuple] = {}

    def ask(i: int) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.__setitem__(i, cache.features(encoder, inputs[i], 3)))
        thread.start()
        return thread

    threads = [ask(0)]
    assert running.wait(10)
    encoder.forward = forward
    threads += [ask(i) for i in range(1, len(inputs))]
    while sum(len(waiting) for waiting in cache._waiting.values()) < len(inputs) - 1:
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(10)
    assert calls == [1, 3], "the first alone, then the four that waited in one call (three distinct inputs)"
    with torch.inference_mode():
        for i, x in enumerate(inputs):
            torch.testing.assert_close(results[i][0], encoder(x[None], 3)[:, 0])


def test_an_input_asked_for_while_it_is_being_encoded_is_not_encoded_again(encoder_calls):
    """A second user clicks the example the first one's request is encoding: it waits for those features."""
    encoder = tiny_encoder("image")
    calls = encoder_calls(encoder)
    running, release = threading.Event(), threading.Event()
    forward = encoder.forward

    def held(x, num_blocks):
        running.set()
        assert release.wait(10)
        return forward(x, num_blocks)

    encoder.forward = held
    cache = FeatureCache(8)
    [image] = _inputs(4, 1)
    results: dict[int, tuple] = {}
    first = threading.Thread(target=lambda: results.__setitem__(0, cache.features(encoder, image, 3)))
    first.start()
    assert running.wait(10)
    second = threading.Thread(target=lambda: results.__setitem__(1, cache.features(encoder, image.clone(), 3)))
    second.start()
    while not any(cache._waiting.values()):
        time.sleep(0.01)
    release.set()
    for thread in (first, second):
        thread.join(10)
    assert calls == [1], "encoded once"
    assert results[1][1] is True and torch.equal(results[1][0], results[0][0]) and results[0][1] is False


def test_an_encoder_failure_reaches_the_inputs_encoded_with_it_only():
    encoder = tiny_encoder("image")
    cache = FeatureCache(8)
    (good,) = _inputs(4, 1)
    with pytest.raises(Exception, match="doesn't match model"):  # timm's check of the input size
        cache.features(encoder, torch.zeros(3, 17, 5), 3)
    assert cache.features(encoder, good, 3)[0].shape == (3, encoder.dim) and not cache._busy


def test_feature_cache_drops_the_least_recently_used_and_owns_its_tensors(encoder_calls):
    encoder = tiny_encoder("image")
    calls = encoder_calls(encoder)
    cache = FeatureCache(2)
    a, b, c = _inputs(1, 3)
    for x in (a, b, a, c):  # a is the most recent before c: c evicts b
        cache.features(encoder, x, 3)
    assert len(cache) == 2 and calls == [1, 1, 1]
    assert cache.features(encoder, a, 3)[1] and not cache.features(encoder, b, 3)[1] and calls == [1, 1, 1, 1]
    with torch.inference_mode():
        torch.testing.assert_close(cache.features(encoder, a, 3)[0], encoder(a[None], 3)[:, 0])
    assert all(entry._base is None for entry in cache._entries.values()), "no entry is a view of a batch"


def test_feature_cache_of_size_zero_keeps_nothing(encoder_calls):
    encoder = tiny_encoder("image")
    calls = encoder_calls(encoder)
    cache = FeatureCache(0)
    (a,) = _inputs(2, 1)
    for _ in range(2):
        assert cache.features(encoder, a, 3)[1] is False
    assert calls == [1, 1] and len(cache) == 0
    with pytest.raises(ValueError, match="0 \\(off\\) or more"):
        FeatureCache(-1)

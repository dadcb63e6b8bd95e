"""Random models: `random_lm` builds any OPT shape in place, tied and initialised as OPT does."""

from __future__ import annotations

import torch
from transformers import OPTConfig

from epalm.model import EPALM, InjectionConfig
from epalm.tiny import random_lm, tiny_adapter, tiny_encoder, tiny_lm

SMALL_OPT = OPTConfig(
    hidden_size=64,
    num_hidden_layers=3,
    ffn_dim=128,
    num_attention_heads=4,
    word_embed_proj_dim=64,
    vocab_size=512,
    max_position_embeddings=64,
    attn_implementation="eager",
)


def test_random_lm_is_built_in_the_asked_dtype_tied_and_initialised_like_opt():
    lm = random_lm(SMALL_OPT, torch.bfloat16, seed=1)
    assert lm.lm_head.weight is lm.model.decoder.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in lm.parameters())
    layer = lm.model.decoder.layers[0]
    assert 0.015 < layer.fc1.weight.float().std() < 0.025
    assert not torch.equal(layer.fc1.weight, layer.fc2.weight.T), "tensors are not copies of each other"
    assert torch.equal(layer.final_layer_norm.weight, torch.ones_like(layer.final_layer_norm.weight))
    assert not layer.fc1.bias.any() and not layer.final_layer_norm.bias.any()
    assert torch.equal(random_lm(SMALL_OPT, torch.bfloat16, seed=1).lm_head.weight, lm.lm_head.weight), "seeded"
    assert not torch.equal(random_lm(SMALL_OPT, torch.bfloat16, seed=2).lm_head.weight, lm.lm_head.weight)


def test_random_lm_runs_under_epalm_and_tiny_adapter_takes_other_widths():
    lm = EPALM(random_lm(SMALL_OPT))
    injection = InjectionConfig(start_layer=0, end_layer=2, num_features=2, prompt_len=3)
    adapter = tiny_adapter(injection, encoder_dim=48, hidden_size=64, embed_dim=64)
    prefix = adapter.prefix(torch.randn(2, 1, 48))
    ids = torch.tensor([[2, 40, 41]])
    with torch.inference_mode():
        logits = lm(ids, torch.ones_like(ids), prefix)
    assert logits.shape == (1, 1 + 3 + 3, 512) and torch.isfinite(logits).all()


def test_tiny_builders_leave_the_callers_random_state_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = tiny_lm(seed=3), tiny_encoder("audio", seed=3), tiny_adapter(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = tiny_lm(seed=3), tiny_encoder("audio", seed=3), tiny_adapter(seed=3)
    for built, rebuilt in zip(first, again):
        for (name, a), (_, b) in zip(built.state_dict().items(), rebuilt.state_dict().items()):
            assert torch.equal(a, b), name


def test_the_tiny_lm_has_a_realistic_logit_scale():
    """With OPT's init (std 0.02) at width 32 every logit stays within about ±0.1 and no adapter can make
    the LM say anything; the tiny LM's next-token logits spread over several units, as a real OPT's do.
    (That another process builds the same weights, tests/test_training.py shows: the CLI, in its own
    process, answers with a trained adapter as this one does.)"""
    from epalm.tiny import tiny_tokenizer

    ids = tiny_tokenizer()(["a man riding a wave on top of a surfboard"], return_tensors="pt")
    with torch.no_grad():
        logits = tiny_lm()(**ids).logits[0]
    assert 2 < logits.std(-1).mean() < 8 and logits.softmax(-1).max() > 0.5

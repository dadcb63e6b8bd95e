"""Injection semantics (one test per rule of the parity README) and the exact KV cache."""

from __future__ import annotations

import pytest
import torch

from epalm.model import EPALM, Adapter, InjectionConfig, Prefix, additive_mask
from epalm.tiny import tiny_lm

ENC_DIM = 24


def make(injection: InjectionConfig, batch: int = 1, seed: int = 0, **lm_overrides) -> tuple[EPALM, Prefix]:
    lm = EPALM(tiny_lm(seed=seed, **lm_overrides))
    adapter = Adapter(injection, ENC_DIM, lm.config.hidden_size, lm.config.word_embed_proj_dim)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.5)
    return lm, adapter.prefix(torch.randn(injection.num_features, batch, ENC_DIM))


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 400, (2, 7), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = 1
    return ids, mask


def run_capturing(lm: EPALM, ids: torch.Tensor, mask: torch.Tensor, prefix: Prefix) -> tuple[torch.Tensor, dict]:
    """The full forward's logits and, per decoder layer, its (input hidden states, 4-D mask)."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen.__setitem__(i, (args[0], kwargs["attention_mask"])), with_kwargs=True
        )
        for i, layer in enumerate(lm.decoder.layers)
    ]
    try:
        with torch.inference_mode():
            return lm(ids, mask, prefix), seen
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize(
    "start, end, n, schedule",
    [
        (3, 15, 6, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]),  # the fixtures' (and OPT-2.7B's 19..31) layout
        (19, 31, 6, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]),
        (2, 7, 3, [0, 1, 2, 2, 2]),  # span 5 not a multiple of 3: step 1, index clamped to N-1
        (1, 4, 6, [0, 1, 2]),  # span <= N: step 1
        (0, 3, 1, [0, 0, 0]),  # N = 1: always the single feature
    ],
)
def test_feature_schedule(start, end, n, schedule):
    injection = InjectionConfig(start, end, n)
    assert [injection.feature_index(i) for i in range(start, end)] == schedule
    assert injection.feature_index(start - 1) is None and injection.feature_index(end) is None


def test_sequence_order_prepend_then_replace_and_late_layers():
    injection = InjectionConfig(start_layer=2, end_layer=5, num_features=3, prompt_len=4)
    lm, prefix = make(injection)
    ids = torch.tensor([[2, 10, 11, 12]])
    _, seen = run_capturing(lm, ids, torch.ones_like(ids), prefix)
    P, T = 4, 4
    for i in (0, 1):  # before the first injection: [prompt ; text]
        assert seen[i][0].shape[1] == P + T
    assert seen[2][0].shape[1] == 1 + P + T  # prepended at `start`
    for i in (2, 3, 4):  # position 0 holds the layer's projected feature
        torch.testing.assert_close(seen[i][0][:, 0], prefix.visual[injection.feature_index(i)], atol=0, rtol=0)
    # layer `end` and later read what the previous layer wrote at position 0, nothing is injected
    with torch.inference_mode():
        out4 = lm.decoder.layers[4](seen[4][0], attention_mask=seen[4][1])
    torch.testing.assert_close(seen[5][0][:, 0], out4[:, 0])


def test_visual_row_and_column_attend_everything_even_pads():
    injection = InjectionConfig(start_layer=1, end_layer=4, num_features=2, prompt_len=3)
    lm, prefix = make(injection, batch=2)
    ids, mask = padded_batch()
    _, seen = run_capturing(lm, ids, mask, prefix)
    before, at_start = seen[0][1], seen[1][1]
    assert before.shape[-1] == 3 + 7 and at_start.shape[-1] == 1 + 3 + 7
    assert (at_start[:, :, 0, :] == 0).all(), "the visual query attends to every position, pads included"
    assert (at_start[:, :, :, 0] == 0).all(), "every query attends to the visual token"
    assert torch.equal(at_start[:, :, 1:, 1:], before)
    # pads are masked as keys for the other queries, and the mask is causal
    assert (before[1, 0, :, 3 + 4 :] < -1e30).all()
    assert (before[0, 0, 0, 1:] < -1e30).all()


def test_prompt_has_no_positions_and_text_positions_count_from_the_text_mask():
    injection = InjectionConfig(start_layer=2, end_layer=4, num_features=1, prompt_len=5)
    lm, prefix = make(injection, batch=2)
    ids, mask = padded_batch()
    _, seen = run_capturing(lm, ids, mask, prefix)
    layer0 = seen[0][0]
    torch.testing.assert_close(layer0[:, :5], prefix.prompt, atol=0, rtol=0)
    table = lm.decoder.embed_positions.weight
    want_rows = torch.tensor([[2, 3, 4, 5, 6, 7, 8], [2, 3, 4, 5, 1, 1, 1]])  # position + 2; pads -> row 1
    want = lm.decoder.embed_tokens(ids) + table[want_rows]
    torch.testing.assert_close(layer0[:, 5:], want, atol=0, rtol=0)


def test_project_in_and_out_when_word_embed_dim_differs():
    injection = InjectionConfig(start_layer=1, end_layer=4, num_features=2, prompt_len=3)
    lm, prefix = make(injection, word_embed_proj_dim=16)
    assert lm.decoder.project_in is not None and prefix.prompt.shape[-1] == 16 and prefix.visual.shape[-1] == 32
    ids = torch.tensor([[2, 40, 41]])
    logits, seen = run_capturing(lm, ids, torch.ones_like(ids), prefix)
    torch.testing.assert_close(seen[0][0][:, :3], lm.decoder.project_in(prefix.prompt))
    assert logits.shape == (1, 1 + 3 + 3, lm.config.vocab_size)


def test_late_layers_see_the_future_through_the_visual_token():
    """Layers >= end read a visual state that attended to later tokens (the original's quirk);
    with end = L the logits at earlier positions no longer depend on later tokens."""
    for end, depends in ((4, True), (6, False)):
        lm, prefix = make(InjectionConfig(start_layer=1, end_layer=end, num_features=2, prompt_len=3))
        a, b = torch.tensor([[2, 40, 41, 42]]), torch.tensor([[2, 40, 41, 99]])
        with torch.inference_mode():
            la, lb = lm(a, torch.ones_like(a), prefix), lm(b, torch.ones_like(b), prefix)
        changed = (la[:, 1:7] - lb[:, 1:7]).abs().max().item()  # all but the visual and last positions
        assert (changed > 1e-6) == depends and (depends or changed == 0), (end, changed)


def test_additive_mask_is_causal_over_the_last_queries():
    mask = additive_mask(torch.tensor([[1, 1, 0, 1]]), queries=2, dtype=torch.float32)
    allowed = (mask == 0)[0, 0].int().tolist()
    assert allowed == [[1, 1, 0, 0], [1, 1, 0, 1]]


VARIANTS = {
    "pre_ln_end_is_last_layer": (InjectionConfig(1, 5, 2, prompt_len=3), {}),
    "late_layers_recomputed": (InjectionConfig(1, 3, 2, prompt_len=3), {}),
    "end_beyond_layers": (InjectionConfig(2, 9, 3, prompt_len=2), {}),
    "post_ln": (InjectionConfig(1, 4, 3, prompt_len=3), {"do_layer_norm_before": False}),
    "project_in_out": (
        InjectionConfig(2, 5, 3, shared_connector=True, prompt_len=4, prompt_mlp=False),
        {"word_embed_proj_dim": 16},
    ),
    "n1_start0_no_prompt": (InjectionConfig(0, 4, 1, prompt_len=0), {}),
    "clamped_schedule": (InjectionConfig(0, 5, 3, prompt_len=2), {}),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_logits_equal_uncached_every_step(name):
    injection, overrides = VARIANTS[name]
    lm, prefix = make(injection, batch=2, **overrides)
    ids, mask = padded_batch()
    with torch.inference_mode():
        a, state = lm.prefill(ids, mask, prefix)  # cached; and the whole sequence re-run each step
        b = lm(ids, mask, prefix)[:, -1]
        for step in range(8):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"step {step}")
            tokens = a.argmax(-1)
            if step == 3:  # beam-style reorder in the middle of decoding
                index = torch.tensor([1, 0])
                state.reorder(index)
                ids, mask, prefix, tokens = ids[index], mask[index], prefix.select(index), tokens[index]
            a = lm.step(state, tokens)
            ids, mask = torch.cat([ids, tokens[:, None]], 1), torch.cat([mask, torch.ones_like(tokens)[:, None]], 1)
            b = lm(ids, mask, prefix)[:, -1]
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_naive_cache_would_be_wrong_here():
    """Guard for the refresh: without it the visual state of layer `end` goes stale."""
    injection = InjectionConfig(1, 4, 2, prompt_len=3)
    lm, prefix = make(injection)
    ids = torch.tensor([[2, 40, 41]])
    with torch.inference_mode():
        _, state = lm.prefill(ids, torch.ones_like(ids), prefix)
        stale = state.late_input[:, 0].clone()
        lm.step(state, torch.tensor([42]))
        assert (state.late_input[:, 0] - stale).abs().max() > 1e-3


def test_bf16_runs_and_stays_close_to_fp32():
    injection = InjectionConfig(1, 5, 2, prompt_len=3)
    lm, prefix = make(injection)
    ids = torch.tensor([[2, 40, 41]])
    with torch.inference_mode():
        ref = lm(ids, torch.ones_like(ids), prefix)
        lm.to(torch.bfloat16)
        low = lm(ids, torch.ones_like(ids), prefix)
        logits, state = lm.prefill(ids, torch.ones_like(ids), prefix)
        step_logits = lm.step(state, logits.argmax(-1))
    assert low.dtype == torch.bfloat16 and torch.isfinite(step_logits).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_packed_weights_give_the_same_logits_and_ids():
    from epalm.decoding import DecodingOptions
    from epalm.engine import generate
    from epalm.model import PackedLinear, pack_linear_weights

    injection = InjectionConfig(1, 5, 2, prompt_len=3)
    lm, prefix = make(injection, batch=2)
    ids, mask = padded_batch()
    options = DecodingOptions(num_beams=2, max_length=15)
    with torch.inference_mode():
        dense_logits, dense_ids = lm(ids, mask, prefix), generate(lm, prefix, ids, mask, options).sequences
    packed = pack_linear_weights(lm)
    assert packed == 6 * 6 + 1 and isinstance(lm.decoder.layers[0].fc1, PackedLinear)
    with torch.inference_mode():
        torch.testing.assert_close(lm(ids, mask, prefix), dense_logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(generate(lm, prefix, ids, mask, options).sequences, dense_ids)


def _failing_reorder(weight, batch_size):
    raise RuntimeError("mkldnn::_reorder_linear_weight: no such operator")


def _wrong_linear(x, weight, bias, attr, scalars, algorithm):
    return torch.zeros(*x.shape[:-1], len(bias) if bias is not None else 1, dtype=x.dtype)


@pytest.mark.parametrize(
    "op, replacement",
    [("_reorder_linear_weight", _failing_reorder), ("_linear_pointwise", _wrong_linear)],
    ids=["broken_op", "wrong_result"],
)
def test_packing_falls_back_to_dense_layers_when_onednn_changes(monkeypatch, caplog, op, replacement):
    from torch import nn

    from epalm.model import pack_linear_weights

    lm, prefix = make(InjectionConfig(1, 5, 2, prompt_len=3), batch=2)
    ids, mask = padded_batch()
    with torch.inference_mode():
        dense_logits = lm(ids, mask, prefix)
    monkeypatch.setattr(torch.ops.mkldnn, op, replacement)
    with caplog.at_level("WARNING", logger="epalm.model"):
        assert pack_linear_weights(lm) == 0
    assert [r.getMessage() for r in caplog.records if "keeping the dense layers" in r.getMessage()], caplog.text
    assert len(caplog.records) == 1, "one log line, not one per layer"
    assert type(lm.decoder.layers[0].fc1) is nn.Linear and type(lm.lm.lm_head) is nn.Linear
    with torch.inference_mode():
        assert torch.equal(lm(ids, mask, prefix), dense_logits)

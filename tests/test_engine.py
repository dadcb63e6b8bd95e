"""The decode engine: the cached, batched decoding gives the ids (and beam scores) of the original
uncached algorithm, each prompt runs once, and a step's tokens reach their listener."""

from __future__ import annotations

import pytest
import torch

from epalm.decoding import DecodingOptions
from epalm.engine import generate
from epalm.model import InjectionConfig
from epalm.original import generate_original

from test_model import make, padded_batch

SETTINGS = {
    "greedy": DecodingOptions(num_beams=1, max_length=20),
    "beam3": DecodingOptions(num_beams=3, max_length=20),
    "beam2_new_tokens": DecodingOptions(num_beams=2, max_new_tokens=9),
}
LAYOUTS = {
    "end_is_last": InjectionConfig(1, 5, 2, prompt_len=3),
    "late_recomputed": InjectionConfig(1, 3, 2, prompt_len=3),
    "post_ln": InjectionConfig(0, 4, 3, prompt_len=2),
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_ids_equal_the_original_uncached_ids(setting, layout, batch):
    overrides = {"do_layer_norm_before": False} if layout == "post_ln" else {}
    lm, prefix = make(LAYOUTS[layout], batch=batch, seed=3, **overrides)
    ids, mask = padded_batch(seed=batch)
    ids, mask = ids[:batch], mask[:batch]
    options = SETTINGS[setting]
    with torch.inference_mode():
        fast = generate(lm, prefix, ids, mask, options)
        slow = generate_original(lm, prefix, ids, mask, options)
    assert torch.equal(fast.sequences, slow.sequences)
    assert torch.equal(fast.sequences[:, : ids.shape[1]], ids), "returned ids start with the input ids"
    limit = options.length_limit(ids.shape[1])
    assert fast.sequences.shape[1] <= limit
    if options.num_beams > 1:
        torch.testing.assert_close(fast.sequence_scores, slow.sequence_scores, atol=1e-5, rtol=0)


def test_beam_search_runs_each_prompt_once_not_once_per_beam(monkeypatch):
    lm, prefix = make(LAYOUTS["late_recomputed"], batch=2, seed=3)
    ids, mask = padded_batch()
    options = DecodingOptions(num_beams=3, max_new_tokens=4)
    widths = []
    first = lm.prefill
    monkeypatch.setattr(lm, "prefill", lambda i, *a: widths.append(len(i)) or first(i, *a))
    with torch.inference_mode():
        out = generate(lm, prefix, ids, mask, options)
    assert widths[0] == 2, "the prompt of each input ran once"
    assert out.sequences.shape[0] == 2 and out.hypotheses and all(len(h) == 3 for h in out.hypotheses)


@pytest.mark.parametrize("beams", [1, 3])
def test_callback_sees_every_step_and_changes_nothing(beams):
    lm, prefix = make(LAYOUTS["late_recomputed"], batch=2, seed=3)
    ids, mask = padded_batch()
    options = DecodingOptions(num_beams=beams, max_length=20, eos_token_id=-1)  # no EOS: every step runs
    seen: list[torch.Tensor] = []
    with torch.inference_mode():
        plain = generate(lm, prefix, ids, mask, options).sequences
        watched = generate(lm, prefix, ids, mask, options, callback=lambda tokens: seen.append(tokens.clone()))
    watched = watched.sequences
    assert torch.equal(plain, watched)
    assert len(seen) == 20 - ids.shape[1] and all(t.shape == (len(ids) * beams,) for t in seen)
    if beams == 1:
        assert torch.equal(torch.stack(seen, dim=1), plain[:, ids.shape[1] :])
    else:  # the kept hypothesis of each item ends with one of its beams' last tokens
        for b in range(len(ids)):
            assert plain[b, -1] in seen[-1][b * beams : (b + 1) * beams]

"""Decoding rules: 4.24 beam rules, EOS and length limits, sampling, streaming text, presets."""

from __future__ import annotations

import pytest
import torch

from epalm.decoding import DecodingOptions, stream_text
from epalm.engine import Request, decode_alone, generate
from epalm.model import InjectionConfig
from epalm.presets import DEFAULT_PRESET, PRESETS

from test_model import make, padded_batch

END_IS_LAST = InjectionConfig(1, 5, 2, prompt_len=3)  # layer `end` is the LM's last


def test_eos_stops_rows_and_pads_finished_ones():
    lm, prefix = make(END_IS_LAST, batch=2, seed=3)
    ids, mask = padded_batch()
    with torch.inference_mode():
        free = generate(lm, prefix, ids, mask, DecodingOptions(num_beams=1, max_length=20)).sequences
    eos = int(free[0, ids.shape[1]])  # make the first new token of row 0 the EOS
    with torch.inference_mode():
        out = generate(lm, prefix, ids, mask, DecodingOptions(num_beams=1, max_length=20, eos_token_id=eos)).sequences
    row0 = out[0, ids.shape[1] :].tolist()
    assert row0[0] == eos and all(t == 1 for t in row0[1:])
    if eos not in out[1, ids.shape[1] :].tolist():
        assert out.shape[1] == 20


def test_at_least_one_token_even_past_max_length():
    lm, prefix = make(END_IS_LAST)
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    with torch.inference_mode():
        out = generate(lm, prefix, ids, torch.ones_like(ids), DecodingOptions(num_beams=1, max_length=3))
    assert out.sequences.shape == (1, 6)


def test_a_beam_search_result_reads_the_same_twice():
    """Finalizing adds the unfinished beams to the hypotheses; the answer and the inspection both read
    the result, and the second read once listed those beams again in place of the worst real one."""
    lm, prefix = make(END_IS_LAST, seed=5)
    ids = torch.tensor([[2, 40, 41]])
    request = Request(prefix, ids, DecodingOptions(num_beams=3, max_new_tokens=4))
    with torch.inference_mode():
        for _ in decode_alone(lm, request):
            pass
    first, second = request.result(), request.result()

    def listed(output):
        return [[(score, hypothesis.tolist()) for score, hypothesis in item] for item in output.hypotheses]

    assert listed(second) == listed(first) and len(listed(first)[0]) == 3
    assert len({tuple(ids) for _, ids in listed(first)[0]}) == 3, "three distinct beams"


def test_beam_length_normalisation_counts_input_ids():
    """4.24 divides a hypothesis' log-prob sum by its whole length, input ids included.
    (end = L, so one forward of the hypothesis gives the logits each step saw.)"""
    lm, prefix = make(InjectionConfig(1, 6, 2, prompt_len=3), seed=5)
    ids = torch.tensor([[2, 40, 41, 42]])
    options = DecodingOptions(num_beams=3, max_length=12)
    with torch.inference_mode():
        out = generate(lm, prefix, ids, torch.ones_like(ids), options)
        seq = out.sequences[0]
        ends_with_eos = seq[-1].item() == options.eos_token_id and len(seq) < 12
        hyp = seq[:-1] if ends_with_eos else seq
        logits = lm(hyp[None], torch.ones_like(hyp[None]), prefix)[0, 1 + 3 :]  # text positions
        logprobs = torch.log_softmax(logits.float(), -1)
        total = sum(logprobs[t, hyp[t + 1]].item() for t in range(ids.shape[1] - 1, len(hyp) - 1))
        if ends_with_eos:
            total += logprobs[len(hyp) - 1, options.eos_token_id].item()
    assert out.sequence_scores[0].item() == pytest.approx(total / len(hyp), abs=1e-4)


def test_sampling_is_seeded_and_respects_top_k():
    lm, prefix = make(END_IS_LAST)
    ids = torch.tensor([[2, 40]])
    options = DecodingOptions(num_beams=1, do_sample=True, top_k=1, max_new_tokens=6, seed=7)
    with torch.inference_mode():
        greedy = generate(lm, prefix, ids, torch.ones_like(ids), DecodingOptions(num_beams=1, max_new_tokens=6))
        top1 = generate(lm, prefix, ids, torch.ones_like(ids), options)
        hot = DecodingOptions(num_beams=1, do_sample=True, temperature=5.0, max_new_tokens=6, seed=11)
        first, second = (generate(lm, prefix, ids, torch.ones_like(ids), hot).sequences for _ in range(2))
    assert torch.equal(top1.sequences, greedy.sequences)
    assert torch.equal(first, second)


def test_streaming_yields_growing_prefixes_that_end_in_the_final_text(tokenizer):
    lm, prefix = make(END_IS_LAST)
    ids = torch.tensor([[2, 40]])
    options = DecodingOptions(num_beams=1, max_new_tokens=12)
    with torch.inference_mode():
        parts = list(stream_text(decode_alone(lm, Request(prefix, ids, options, torch.ones_like(ids))), tokenizer))
        final = generate(lm, prefix, ids, torch.ones_like(ids), options).sequences[0, 2:]
    assert len(parts) >= 2
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(parts, parts[1:]))
    assert parts[-1] == tokenizer.decode(final, skip_special_tokens=True)


def test_options_are_validated():
    with pytest.raises(ValueError):
        DecodingOptions(num_beams=2, do_sample=True)
    with pytest.raises(ValueError):
        DecodingOptions(max_length=None, max_new_tokens=None)
    with pytest.raises(ValueError, match="sampling needs temperature > 0"):
        DecodingOptions(num_beams=1, do_sample=True, temperature=0)
    assert DecodingOptions(temperature=0, top_p=0).temperature == 0, "ignored (and accepted) when nothing samples"
    with pytest.raises(ValueError):
        DecodingOptions(min_answer_tokens=0)


def test_presets_are_rules_over_the_task_settings():
    """A preset sets only its own fields: a task's length limits, minimum answer and seed survive it."""
    task = DecodingOptions(num_beams=4, max_new_tokens=5, min_answer_tokens=3, seed=9, length_penalty=0.5)
    assert PRESETS[DEFAULT_PRESET].apply(task) == task, "paper: the task's own settings"
    fast, sampling = PRESETS["fast"].apply(task), PRESETS["sampling"].apply(task)
    assert (fast.num_beams, fast.do_sample, fast.max_new_tokens, fast.seed) == (1, False, 5, 9)
    assert (sampling.num_beams, sampling.do_sample, sampling.temperature, sampling.top_p) == (1, True, 0.7, 0.9)
    assert (sampling.max_new_tokens, sampling.min_answer_tokens, sampling.seed) == (5, 3, 9)
    assert fast.streams and sampling.streams and not task.streams
    assert all(preset.label for preset in PRESETS.values())


STRATEGIES = {
    "beam3": dict(num_beams=3),
    "greedy": dict(num_beams=1),
    "sampling": dict(num_beams=1, do_sample=True, temperature=0.7, top_p=0.9, seed=5),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("prompt_ids", [28, 29, 30, 31, 60])
@pytest.mark.parametrize("min_answer", [1, 8])
def test_long_prompts_get_the_minimum_answer_room(strategy, prompt_ids, min_answer):
    """max_length 30 counted over the prompt: 4.24's beam finalize crashed at 30+ ids, and greedy
    or sampling gave one token. With `min_answer_tokens` the limit leaves that many new tokens
    (1: the original's own rule of one token)."""
    lm, prefix = make(END_IS_LAST)
    ids = torch.randint(4, 400, (1, prompt_ids), generator=torch.Generator().manual_seed(prompt_ids))
    ids[0, 0] = 2
    never = lm.config.vocab_size  # an EOS id outside the vocabulary: every allowed token is generated
    options = DecodingOptions(max_length=30, min_answer_tokens=min_answer, eos_token_id=never, **STRATEGIES[strategy])
    room = max(30 - prompt_ids, min_answer)
    assert options.length_limit(prompt_ids) == prompt_ids + room
    assert options.extends_limit(prompt_ids) == (30 - prompt_ids < min_answer)
    with torch.inference_mode():
        out = generate(lm, prefix, ids, torch.ones_like(ids), options).sequences
    assert torch.equal(out[:, :prompt_ids], ids)
    assert out.shape[1] == prompt_ids + room


def test_a_raised_limit_continues_the_original_greedy_answer():
    """Where the original cut a greedy answer at max_length, the raised limit only adds tokens."""
    lm, prefix = make(END_IS_LAST)
    ids = torch.randint(4, 400, (1, 28), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = 2
    with torch.inference_mode():
        cut = DecodingOptions(num_beams=1, max_length=30)
        raised = DecodingOptions(num_beams=1, max_length=30, min_answer_tokens=8)
        original, longer = (generate(lm, prefix, ids, torch.ones_like(ids), o).sequences for o in (cut, raised))
    assert original.shape[1] == 30 and longer.shape[1] == 36
    assert torch.equal(longer[:, :30], original)

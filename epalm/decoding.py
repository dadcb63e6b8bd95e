"""Decoding rules: greedy, sampling and beam search with the rules of transformers 4.24 (the version
the adapters were evaluated with), one step at a time, kept apart from the model: `epalm.engine`
applies each request's rule to its rows of a batched step (and `epalm.original`, the original
uncached algorithm, applies the same rules).

Returned ids follow the original `generate`: input ids (with their padding) then new tokens;
`max_length` counts input ids plus new tokens, but always leaves room for `min_answer_tokens`
new tokens (1 by default: the original's rule that at least one token is generated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import bounded

MAX_BEAMS = 8  # beams of one request: each is a row of every decode step
MAX_LENGTH = 512  # ids of one answer (a caption is 10-20); OPT has 2,048 positions


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0  # NaN: False


@dataclass(frozen=True)
class DecodingOptions:
    """How to generate, like transformers' `GenerationConfig`. The defaults are the paper's:
    3 beams, max_length 30."""

    num_beams: int = 3
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    max_length: int | None = 30  # input ids + new tokens, as the original counts
    max_new_tokens: int | None = None  # when set, replaces max_length
    min_answer_tokens: int = 1  # a prompt leaving fewer new tokens under max_length extends the limit to this many
    length_penalty: float = 1.0
    eos_token_id: int = 2
    pad_token_id: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        """Every setting in its bounds, checked before anything is allocated: a request (or a stranger's
        adapter config) asking for 2,000 beams or a million tokens is refused, not run."""
        bounded("num_beams", self.num_beams, 1, MAX_BEAMS)
        if not isinstance(self.do_sample, bool):
            raise ValueError("do_sample must be true or false")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("beam sampling is not supported: use num_beams=1 with do_sample")
        if self.max_length is None and self.max_new_tokens is None:
            raise ValueError("set max_length or max_new_tokens")
        for name in ("max_length", "max_new_tokens"):
            if getattr(self, name) is not None:
                bounded(name, getattr(self, name), 1, MAX_LENGTH)
        bounded("min_answer_tokens", self.min_answer_tokens, 1, MAX_LENGTH)
        bounded("length_penalty", self.length_penalty, -10, 10, whole=False)
        for name in ("eos_token_id", "pad_token_id"):  # -1: none (a decode that never stops early)
            bounded(name, getattr(self, name), -1, 2**31 - 1)
        if self.seed is not None:
            bounded("seed", self.seed, 0, 2**63 - 1)
        if self.do_sample:  # only sampling reads these (greedy and beams ignore them, whatever they are)
            if not (_positive(self.temperature) and _positive(self.top_p) and self.top_p <= 1):
                raise ValueError("sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
            bounded("temperature", self.temperature, 1e-3, 100, whole=False)
            bounded("top_k", self.top_k, 0, 2**31 - 1)

    def length_limit(self, input_length: int) -> int:
        """The most ids (input and new) a row may reach.

        `max_length` as the original counted it, unless the prompt leaves fewer than
        `min_answer_tokens` new tokens: the original then crashed in beam search (30+ ids) or cut the
        answer to a token or two; a decode that ends before the original limit is unchanged by this.
        """
        if self.max_new_tokens is not None:
            return input_length + self.max_new_tokens
        return max(self.max_length, input_length + self.min_answer_tokens)

    def extends_limit(self, input_length: int) -> bool:
        """Whether a prompt this long leaves too little room under `max_length`, so that
        `length_limit` raised it to `min_answer_tokens` new tokens."""
        return self.max_new_tokens is None and input_length + self.min_answer_tokens > self.max_length

    @property
    def streams(self) -> bool:
        """Greedy and sampling produce one token per step and can stream; beam search cannot."""
        return self.num_beams == 1


# Called once per decoding step with the tokens just chosen ([B], or [B * num_beams] in beam search),
# right after the forward that scored them: a hook for timing and progress (gpt-fast's `callback`).
StepCallback = Callable[[torch.Tensor], None]


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, L] input ids then generated ids
    sequence_scores: torch.Tensor | None = None  # [B], beam search only (4.24 normalisation)
    hypotheses: list[list[tuple[float, torch.Tensor]]] | None = None  # beam search: every item's final (score, ids)


Trace = Callable[[torch.Tensor, torch.Tensor], None]
"""Called at every step, when asked for, with the ids so far [rows, L] and the model's next-token
log-probabilities for them [rows, vocab] (float32, before any sampling warper): what
`epalm.inspection` reads token confidences from. Decoding does the same with or without it."""


class TokenRule:
    """How greedy and sampling pick each step's tokens for one request's rows, kept apart from the
    model so that a scheduler can apply it to that request's slice of a batched step.

    Rows that emitted EOS get `pad_token_id` afterwards; `done` once every row is done or the
    length limit is reached.
    """

    order = None  # rows never move

    def __init__(self, options: DecodingOptions, input_ids: torch.Tensor, trace: Trace | None = None) -> None:
        if not options.streams:
            raise ValueError("beam search does not stream; use generate()")
        self.options, self.trace = options, trace
        self.warpers = LogitsProcessorList()
        if options.do_sample:
            if options.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(options.temperature))
            if options.top_k:
                self.warpers.append(TopKLogitsWarper(options.top_k))
            if options.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(options.top_p))
        self.generator = None
        if options.seed is not None:
            self.generator = torch.Generator(device=input_ids.device).manual_seed(options.seed)
        self.limit = options.length_limit(input_ids.shape[1])
        self.ids = input_ids
        self.unfinished = torch.ones(len(input_ids), dtype=torch.bool, device=input_ids.device)
        self.done = False

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row ([rows]) from the model's next-token logits [rows, V]."""
        options = self.options
        scores = logits.float()
        if self.trace is not None:
            self.trace(self.ids, torch.log_softmax(scores, dim=-1))
        if options.do_sample:
            probs = torch.softmax(self.warpers(self.ids, scores), dim=-1)
            tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        else:
            tokens = scores.argmax(-1)
        tokens = torch.where(self.unfinished, tokens, options.pad_token_id)
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.unfinished &= tokens != options.eos_token_id
        self.done = not self.unfinished.any() or self.ids.shape[1] >= self.limit
        return tokens

    def result(self) -> GenerationOutput:
        return GenerationOutput(self.ids)


class _Hypotheses:
    """Finished hypotheses of one batch item, scored as transformers 4.24 did: the sum of
    log-probs divided by the length of the *whole* id sequence (input ids and pads included)."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.beams: list[tuple[float, torch.Tensor]] = []
        self.worst_score = 1e9

    def add(self, ids: torch.Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / (ids.shape[-1] ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, ids))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / cur_len**self.length_penalty


class BeamRule:
    """Beam search as transformers 4.24 ran it (length_penalty, early_stopping False, 2k candidates),
    one step at a time over a request's `batch * num_beams` rows: `choose` returns the tokens and
    sets `order`, the rows (of these) each new token continues, which the cache must follow."""

    def __init__(self, options: DecodingOptions, input_ids: torch.Tensor, trace: Trace | None = None) -> None:
        self.options, self.trace = options, trace
        self.k, self.batch = options.num_beams, input_ids.shape[0]
        self.ids = input_ids.repeat_interleave(self.k, dim=0)
        self.limit = options.length_limit(input_ids.shape[1])
        beam_scores = torch.zeros(self.batch, self.k, device=input_ids.device)
        beam_scores[:, 1:] = -1e9
        self.beam_scores = beam_scores.view(-1)
        self.hyps = [_Hypotheses(self.k, options.length_penalty) for _ in range(self.batch)]
        self.finished = [False] * self.batch
        self._result: GenerationOutput | None = None
        self.order: torch.Tensor | None = None
        self.done = False

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        k, batch, hyps, done = self.k, self.batch, self.hyps, self.finished
        eos, pad = self.options.eos_token_id, self.options.pad_token_id
        device, ids = logits.device, self.ids
        cur_len = ids.shape[1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if self.trace is not None:
            self.trace(ids, logprobs)
        scores = logprobs + self.beam_scores[:, None]
        vocab = scores.shape[-1]
        top_scores, top_ids = torch.topk(scores.view(batch, k * vocab), 2 * k, dim=1, largest=True, sorted=True)
        top_beams, top_tokens = top_ids // vocab, top_ids % vocab
        next_scores = torch.zeros(batch, k, device=device)
        next_tokens = torch.full((batch, k), pad, dtype=torch.long, device=device)
        next_rows = torch.zeros(batch, k, dtype=torch.long, device=device)
        for b in range(batch):
            if done[b]:
                continue
            filled = 0
            for rank, (token, score, beam) in enumerate(
                zip(top_tokens[b].tolist(), top_scores[b].tolist(), top_beams[b].tolist())
            ):
                row = b * k + beam
                if token == eos:
                    if rank < k:
                        hyps[b].add(ids[row].clone(), score)
                else:
                    next_scores[b, filled], next_tokens[b, filled], next_rows[b, filled] = score, token, row
                    filled += 1
                if filled == k:
                    break
            done[b] = done[b] or hyps[b].is_done(top_scores[b].max().item(), cur_len)
        self.beam_scores, self.order, tokens = next_scores.view(-1), next_rows.view(-1), next_tokens.view(-1)
        self.ids = torch.cat([ids.index_select(0, self.order), tokens[:, None]], dim=1)
        self.done = all(done) or self.ids.shape[1] >= self.limit
        return tokens

    def result(self) -> GenerationOutput:
        """The best beams, finalized once (finalizing adds the unfinished beams to the hypotheses: a second
        pass would add them again)."""
        if self._result is None:
            eos, pad = self.options.eos_token_id, self.options.pad_token_id
            self._result = _finalize(self.hyps, self.finished, self.ids, self.beam_scores, self.limit, eos, pad, self.k)
        return self._result


StepRule = TokenRule | BeamRule


def beam_rows(batch: int, num_beams: int, device: torch.device | None = None) -> torch.Tensor:
    """The row index that expands `batch` inputs to `num_beams` rows each. An input's beams are the
    same row until the first choice, so its prompt runs once and the cache is expanded after
    (the original ran it on every beam: the same numbers, `num_beams` times the work)."""
    return torch.arange(batch, device=device).repeat_interleave(num_beams)


def step_rule(options: DecodingOptions, input_ids: torch.Tensor, trace: Trace | None = None) -> StepRule:
    """The per-request rule for `options`: beam search, or greedy / sampling."""
    return BeamRule(options, input_ids, trace) if options.num_beams > 1 else TokenRule(options, input_ids, trace)


def stopped(length: int, limit: int) -> bool:
    """Whether a finished beam hypothesis of `length` ids stopped on EOS (which 4.24 then appended to
    it) rather than at the length limit: the hypotheses keep their ids without that EOS."""
    return length < limit


def _finalize(
    hyps: list[_Hypotheses],
    done: list[bool],
    ids: torch.Tensor,
    beam_scores: torch.Tensor,
    limit: int,
    eos: int,
    pad: int,
    k: int,
) -> GenerationOutput:
    for b, hyp in enumerate(hyps):
        if not done[b]:
            for beam in range(k):
                hyp.add(ids[b * k + beam], beam_scores[b * k + beam].item())
    best = [sorted(hyp.beams, key=lambda x: x[0])[-1] for hyp in hyps]
    lengths = [len(seq) for _, seq in best]
    width = min(max(lengths) + 1, limit)
    out = ids.new_full((len(best), width), pad)
    for i, (_, seq) in enumerate(best):
        out[i, : len(seq)] = seq
        if stopped(len(seq), limit):
            out[i, len(seq)] = eos
    return GenerationOutput(out, torch.tensor([score for score, _ in best]), [hyp.beams for hyp in hyps])


def stream_text(tokens: Iterator[torch.Tensor], tokenizer, row: int = 0) -> Iterator[str]:
    """Partial answers of one row as its tokens arrive: each yielded string extends the last.

    Text is re-decoded from all ids so far (byte-level BPE merges across tokens); a string ending
    in an incomplete UTF-8 character is held back until the character is complete.
    """
    ids: list[int] = []
    shown = ""
    for step in tokens:
        ids.append(int(step[row]))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text != shown and not text.endswith("\ufffd") and text.startswith(shown):
            shown = text
            yield shown
    final = tokenizer.decode(ids, skip_special_tokens=True)
    if final != shown:
        yield final

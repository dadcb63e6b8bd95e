"""The original eP-ALM decoding, uncached: every step re-runs the prompt, the injection and all tokens so
far through the whole LM, each beam a row from the start (`evaluate` of the authors' code with
transformers 4.24's `generate`).

Not a serving path: it is the oracle the engine's cached decoding is tested against (the same ids,
the same beam scores) and the baseline `bench/` measures. It applies the same step rules
(`epalm.decoding`) as the engine, so what it checks is the cache, the batching and the beam bookkeeping.
"""

from __future__ import annotations

import torch

from .decoding import DecodingOptions, GenerationOutput, StepCallback, beam_rows, step_rule
from .model import EPALM, Prefix


@torch.inference_mode()
def generate_original(
    model: EPALM,
    prefix: Prefix,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    options: DecodingOptions,
    callback: StepCallback | None = None,
) -> GenerationOutput:
    """Decode as the original did: ids as it returned them (input ids, then new ids)."""
    rule = step_rule(options, input_ids)
    ids, mask = input_ids, attention_mask
    if options.num_beams > 1:  # the original expanded every input to its beams before the first forward
        rows = beam_rows(len(ids), options.num_beams, ids.device)
        ids, mask, prefix = ids.index_select(0, rows), mask.index_select(0, rows), prefix.select(rows)
    while True:
        tokens = rule.choose(model(ids, mask, prefix)[:, -1])
        if callback is not None:
            callback(tokens)
        if rule.done:
            return rule.result()
        if rule.order is not None:
            ids, mask, prefix = (
                ids.index_select(0, rule.order),
                mask.index_select(0, rule.order),
                prefix.select(rule.order),
            )
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(tokens), 1)], dim=1)

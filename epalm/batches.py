"""What an adapter trains on: each row's token ids (cut to the LM's positions), the epochs' order and
the collated batches.

The ids are the original's (`TextFormat.training_ids`: BOS, the prompt, the caption or answer, EOS),
computed once per row; the labels are the ids (pads masked) or, with `answer_loss_only`, the answer
and EOS only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import Sampler

from .data import BadRow, Dataset, Example
from .tasks import TextFormat

log = logging.getLogger(__name__)

CHARS_PER_POSITION = 8  # a text is cut to this many characters per LM position before it is tokenized


class EpochSampler(Sampler[int]):
    """A fresh seeded permutation each epoch: the order of epoch e is known again on --resume.
    (Not `set_epoch`: accelerate would set that from its own count of passes, which restarts at 0.)"""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class TokenizedRows:
    """Every row's training ids and prompt length, computed once. A text longer than the LM's
    `positions` is cut to them (its end, EOS included, is then not trained on), saying so, and the
    row's example is replaced by one holding the cut text; a question that leaves no room is a bad row."""

    def __init__(self, dataset: Dataset, text: TextFormat, tokenizer: Any, positions: int) -> None:
        self.tokenizer = tokenizer
        self.ids: dict[Example, tuple[list[int], int]] = {}
        chars = positions * CHARS_PER_POSITION
        cut: list[Example] = []
        for split in (dataset.train, dataset.validation):
            kept = []
            for example in split:
                question = example.question[:chars] if example.question else example.question
                prompt = text.prompt_ids(tokenizer, question)
                if len(prompt) >= positions:
                    dataset.bad.append(BadRow(example.where, f"the question fills the LM's {positions} positions"))
                    continue
                ids = text.training_ids(tokenizer, question, example.answer[:chars])
                if len(ids) > positions or len(example.answer) > chars or question != example.question:
                    ids = ids[:positions]
                    answer = tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True).strip()
                    cut.append(example)
                    example = replace(example, answer=answer, question=question)
                self.ids[example] = (ids, len(prompt))
                kept.append(example)
            split[:] = kept
        dataset.cut = len(cut)
        if cut:
            longest = max(cut, key=lambda e: len(e.answer) + len(e.question or ""))
            log.warning(
                "%d texts are longer than the LM's %d positions and were cut to them (the longest: %s, %s characters)",
                len(cut),
                positions,
                longest.where,
                f"{len(longest.answer) + len(longest.question or ''):,}",
            )

    def collate(self, examples: list[Example], answer_loss_only: bool) -> dict[str, Any]:
        """Right-padded ids, their mask and the labels (-100: no loss) of a batch of rows."""
        ids = [self.ids[e][0] for e in examples]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        labels = torch.full((len(ids), width), -100, dtype=torch.long)
        for row, (seq, example) in enumerate(zip(ids, examples)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            start = self.ids[example][1] if answer_loss_only else 0
            labels[row, start : len(seq)] = input_ids[row, start : len(seq)]
        return {"examples": examples, "input_ids": input_ids, "attention_mask": mask, "labels": labels}

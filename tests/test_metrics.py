"""Validation metrics against values of the reference implementations."""

from __future__ import annotations

import pytest

from epalm.metrics import caption_scores, normalize_answer, ptb_tokenize, vqa_accuracy

# (caption, what pycocoevalcap's Java PTBTokenizer + punctuation removal returns for it)
PTB = [
    ("A man riding a wave.", "a man riding a wave"),
    ("The dog's toy, isn't it?", "the dog 's toy is n't it"),
    ("A black-and-white photo of 2 cats (sleeping).", "a black-and-white photo of 2 cats -lrb- sleeping -rrb-"),
    ('He said "hello" -- then left...', "he said hello then left"),
    ("Cost: $5.50; 100% sure!", "cost $ 5.50 100 % sure"),
    ("Two men's bikes aren't here", "two men 's bikes are n't here"),
    ("an 'old' train", "an old train"),
]


@pytest.mark.parametrize("caption, tokens", PTB)
def test_tokenization_matches_the_coco_toolkit(caption, tokens):
    assert ptb_tokenize(caption) == tokens


def test_caption_scores_match_the_coco_toolkit():
    # pycocoevalcap with its own PTBTokenizer on the same input: CIDEr 4.393910, BLEU-4 0.688725
    scores = caption_scores(
        ["a man riding a wave", "A dog on a couch."],
        [["A man riding a wave.", "a surfer on a wave"], ["A cat on a couch."]],
    )
    assert scores["CIDEr"] == pytest.approx(4.393910474, abs=1e-6)
    assert scores["BLEU-4"] == pytest.approx(0.688724654, abs=1e-6)
    assert caption_scores(["a red"], [["a blue"]])["BLEU-4"] < 1e-3


def test_vqa_accuracy_rule():
    assert normalize_answer(" Two dogs.") == "2 dogs" and normalize_answer("the Yes!") == "yes"
    assert vqa_accuracy(["2"], [["two"]]) == 1.0
    assert vqa_accuracy(["cat"], [["dog"]]) == 0.0
    # ten human answers, two agree with the prediction: each leave-one-out subset scores min(1, k/3)
    assert vqa_accuracy(["2"], [["two"] * 2 + ["3"] * 8]) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy(["3"], [["two"] * 2 + ["3"] * 8]) == 1.0

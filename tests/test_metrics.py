"""The metrics against the official implementations, on fixed inputs whose official results are stored in
tests/fixtures/metrics (made outside this repository with the official code: the COCO caption toolkit's
COCOEvalCap, the VQA evaluation of GT-Vision-Lab/VQA, eP-ALM's GQA evaluator)."""

from __future__ import annotations

import json

import pytest

from epalm import metrics
from epalm.metrics import (
    caption_scores,
    coco_caption_scores,
    exact_accuracy,
    normalised_accuracy,
    normalize_answer,
    ptb_tokenize,
    vqa_accuracy,
    vqa_scores,
)

from conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "metrics"
COCO = json.loads((FIXTURES / "coco_captions.json").read_text())
VQA = json.loads((FIXTURES / "vqa_official.json").read_text())
NORMALISED = json.loads((FIXTURES / "epalm_normalised.json").read_text())

# (caption, what pycocoevalcap's Java PTBTokenizer + punctuation removal returns for it)
PTB = [
    ("A man riding a wave.", "a man riding a wave"),
    ("The dog's toy, isn't it?", "the dog 's toy is n't it"),
    ("A black-and-white photo of 2 cats (sleeping).", "a black-and-white photo of 2 cats -lrb- sleeping -rrb-"),
    ('He said "hello" -- then left...', "he said hello then left"),
    ("Cost: $5.50; 100% sure!", "cost $ 5.50 100 % sure"),
    ("Two men's bikes aren't here", "two men 's bikes are n't here"),
    ("an 'old' train", "an old train"),
    ("It's 7:30 a.m. at the U.S. border", "it 's 7:30 a.m. at the u.s. border"),
    ("Meet at 10:15, e.g. now.", "meet at 10:15 e.g. now"),
]


@pytest.mark.parametrize("caption, tokens", PTB)
def test_tokenization_matches_the_coco_toolkit(caption, tokens):
    assert ptb_tokenize(caption) == tokens


def _fixture_captions() -> tuple[dict, dict]:
    return COCO["predictions"], COCO["references"]


@pytest.mark.skipif(not metrics.java_available(), reason="the toolkit's PTB tokenizer and METEOR need a Java runtime")
def test_caption_scores_with_java_are_cocoevalcaps():
    result = coco_caption_scores(*_fixture_captions())
    assert result.tokenizer == metrics.JAVA_TOKENIZER
    assert result.scores.keys() == COCO["expected"].keys()
    for name, value in COCO["expected"].items():
        assert result.scores[name] == pytest.approx(value, abs=1e-9), name


def test_caption_scores_without_java_agree_and_say_so(monkeypatch):
    """The Python tokenizer gives the toolkit's tokens on these captions, so every score but METEOR
    (Java only, left out) is COCOEvalCap's; the result names the tokenizer used."""
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    result = coco_caption_scores(*_fixture_captions())
    assert result.tokenizer == metrics.PYTHON_TOKENIZER and "METEOR" not in result.scores
    for name, value in COCO["expected"].items():
        if name != "METEOR":
            assert result.scores[name] == pytest.approx(value, abs=1e-9), name


def test_training_caption_scores_match_the_coco_toolkit():
    # pycocoevalcap with its own PTBTokenizer on the same input: CIDEr 4.393910, BLEU-4 0.688725
    scores = caption_scores(
        ["a man riding a wave", "A dog on a couch."],
        [["A man riding a wave.", "a surfer on a wave"], ["A cat on a couch."]],
    )
    assert set(scores) == {"CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}
    assert scores["CIDEr"] == pytest.approx(4.393910474, abs=1e-6)
    assert scores["BLEU-4"] == pytest.approx(0.688724654, abs=1e-6)
    assert caption_scores(["a red"], [["a blue"]])["BLEU-4"] < 1e-3


def test_caption_scores_need_a_prediction_per_reference():
    with pytest.raises(ValueError, match="every key"):
        coco_caption_scores({1: "a cat"}, {1: ["a cat"], 2: ["a dog"]}, java=False)


def _vqa_inputs() -> tuple[dict, dict, dict, dict]:
    annotations = VQA["annotations"]["annotations"]
    predictions = {p["question_id"]: p["answer"] for p in VQA["predictions"]}
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations}
    answer_types = {a["question_id"]: a["answer_type"] for a in annotations}
    question_types = {a["question_id"]: a["question_type"] for a in annotations}
    return predictions, answers, answer_types, question_types


def test_vqa_scores_are_the_official_evaluations():
    """26 questions covering the official rules: normalisation only when the humans disagree, number
    words (none -> 0), articles, commas in numbers, periods (32 at most), the contractions table."""
    scores = vqa_scores(*_vqa_inputs())
    expected = VQA["expected"]
    assert {str(k): v for k, v in scores.per_question.items()} == expected["per_question"]
    assert scores.overall == expected["overall"]
    assert scores.per_answer_type == expected["perAnswerType"]
    assert scores.per_question_type == expected["perQuestionType"]


def test_vqa_rule_cases():
    assert normalize_answer(" Two dogs.") == "2 dogs" and normalize_answer("the Yes!") == "yes"
    assert normalize_answer("dont") == "don't" and normalize_answer("none") == "0"
    assert vqa_accuracy(["2"], [["two"]]) == 1.0, "one reference (a user's data): normalised exact match"
    assert vqa_accuracy(["cat"], [["dog"]]) == 0.0
    # ten human answers, two agree with the prediction: each leave-one-out subset scores min(1, k/3)
    assert vqa_accuracy(["2"], [["two"] * 2 + ["3"] * 8]) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy(["3"], [["two"] * 2 + ["3"] * 8]) == 1.0
    assert vqa_accuracy(["Two"], [["two"] * 10]) == 0.0, "ten equal answers: nothing is normalised"


def test_normalised_accuracy_is_epalms_and_exact_accuracy_gqas():
    predictions = [p for p, _ in NORMALISED["cases"]]
    labels = [{answer: 1.0} for _, answer in NORMALISED["cases"]]
    for i, (prediction, label) in enumerate(zip(predictions, labels)):
        assert normalised_accuracy([prediction], [label]) == NORMALISED["expected"]["per_question"][str(i)], i
    assert normalised_accuracy(predictions, labels) == pytest.approx(NORMALISED["expected"]["overall"])
    assert normalised_accuracy(["a dog"], [{"dog": 0.6, "cat": 1.0}]) == 0.6, "the answer's weight"
    assert exact_accuracy(["yes", "Yes", "no"], ["yes", "yes", "no"]) == pytest.approx(2 / 3)


def test_a_java_tokenizer_that_fails_falls_back_to_python_and_says_why(monkeypatch):
    import subprocess

    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def broken(self, captions):
        raise subprocess.CalledProcessError(1, ["java", "-cp", "stanford-corenlp-3.4.1.jar"])

    monkeypatch.setattr(PTBTokenizer, "tokenize", broken)
    result = coco_caption_scores(*_fixture_captions(), java=True)
    assert result.tokenizer.startswith("Python PTB tokenizer (the Java one failed") and "METEOR" not in result.scores
    assert result.scores["CIDEr"] == pytest.approx(COCO["expected"]["CIDEr"], abs=1e-9)

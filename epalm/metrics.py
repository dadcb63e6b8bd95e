"""Validation metrics of the original recipe: CIDEr and BLEU-4 for captions, VQA accuracy for QA.

CIDEr-D and BLEU are computed by the COCO caption toolkit itself (`pycocoevalcap`, the code the
authors' `language_evaluation` wraps). Its PTB tokenizer is a Java program; captions are
tokenized here in Python the way it does (lower case, clitics and punctuation split off, the
toolkit's punctuation list removed), so validation needs no Java. QA answers are scored with the
VQA rule (official answer normalisation; min(1, matches / 3) over leave-one-out subsets when
several reference answers are given), which for one reference answer is normalised exact match.
"""

from __future__ import annotations

import re

from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider_scorer import CiderScorer
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_CLITIC = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\.\.\.|--|-[lr][rsc]b-|\w+(?:[-.]\w+)*|\S")


def ptb_tokenize(text: str) -> str:
    """Lower-cased PTB tokens without punctuation, as pycocoevalcap's PTBTokenizer gives them."""
    text = text.lower()
    for bracket, token in _BRACKETS.items():
        text = text.replace(bracket, token)
    tokens = _TOKEN.findall(_CLITIC.sub(r"\1 \2", text))
    return " ".join(t for t in tokens if t not in PUNCTUATIONS and t != '"')


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus CIDEr (CIDEr-D, as the toolkit's `Cider`) and BLEU-1..4 of one prediction per item
    against its reference captions."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need one list of references per prediction, and at least one prediction")
    cider, bleu = CiderScorer(n=4, sigma=6.0), BleuScorer(n=4)
    for prediction, refs in zip(predictions, references):
        hypothesis, tokenized = ptb_tokenize(prediction), [ptb_tokenize(r) for r in refs]
        cider += (hypothesis, tokenized)
        bleu += (hypothesis, tokenized)
    cider_score, _ = cider.compute_score()
    bleu_scores, _ = bleu.compute_score(option="closest", verbose=0)
    return {"CIDEr": float(cider_score), **{f"BLEU-{i + 1}": float(s) for i, s in enumerate(bleu_scores)}}


_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation (punctuation, number words to digits, no articles);
    its table of apostrophe-less contractions ("dont" -> "don't") is not applied."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    return " ".join(_NUMBERS.get(w, w) for w in out.lower().split() if w not in _ARTICLES)


def vqa_accuracy(predictions: list[str], answers: list[list[str]]) -> float:
    """Mean VQA accuracy; `answers[i]` holds item i's reference answers (one or ten)."""
    if len(predictions) != len(answers) or not predictions:
        raise ValueError("need one list of answers per prediction, and at least one prediction")
    total = 0.0
    for prediction, refs in zip(predictions, answers):
        guess, refs = normalize_answer(prediction), [normalize_answer(r) for r in refs]
        if len(refs) == 1:
            total += float(guess == refs[0])
            continue
        subsets = [refs[:i] + refs[i + 1 :] for i in range(len(refs))]
        total += sum(min(1.0, sum(r == guess for r in others) / 3) for others in subsets) / len(subsets)
    return total / len(predictions)


def exact_match(predictions: list[str], targets: list[str]) -> float:
    """Share of predictions equal to their target after stripping and lower-casing."""
    if len(predictions) != len(targets) or not predictions:
        raise ValueError("need one target per prediction, and at least one prediction")
    return sum(p.strip().lower() == t.strip().lower() for p, t in zip(predictions, targets)) / len(predictions)

"""The benchmarks' metrics, by their official rules, and the validation metrics of training.

Captions: the COCO caption toolkit itself (`pycocoevalcap`, what COCOEvalCap and the authors'
`language_evaluation` run): BLEU-1..4, METEOR, ROUGE-L and CIDEr-D over PTB-tokenized text. Its
PTB tokenizer (and METEOR) are Java programs; where no Java runtime is found the captions are
tokenized here in Python the way it does (lower case, clitics and punctuation split off, the toolkit's
punctuation list removed) and METEOR is left out, and the result says so (`CaptionScores.tokenizer`).

VQAv2: the official evaluation (GT-Vision-Lab/VQA, `vqaEval.py`), rule for rule: answers are
normalised (punctuation, number words, articles, its table of apostrophe-less contractions) only
when the ten human answers are not all the same, and a prediction scores the mean over the ten
leave-one-out subsets of min(1, matches / 3); percentages rounded to 2 decimals as it reports them.
GQA (`eval.py` of the GQA release) and the video QA sets score exact string equality; eP-ALM
scored them after the same VQA normalisation (`normalised_accuracy`), which is what its paper reports.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

log = logging.getLogger(__name__)
# -- captions ------------------------------------------------------------------------------------

_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_CLITIC = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\.\.\.|--|-[lr][rsc]b-|\d+(?::\d+)+|(?:[a-z]\.){2,}|\w+(?:[-.]\w+)*|\S")
JAVA_TOKENIZER = "PTB tokenizer (Java, pycocoevalcap)"
PYTHON_TOKENIZER = "Python PTB tokenizer (no Java runtime found; METEOR needs Java and is left out)"


def ptb_tokenize(text: str) -> str:
    """Lower-cased PTB tokens without punctuation, as pycocoevalcap's PTBTokenizer gives them."""
    text = text.lower()
    for bracket, token in _BRACKETS.items():
        text = text.replace(bracket, token)
    tokens = _TOKEN.findall(_CLITIC.sub(r"\1 \2", text))
    return " ".join(t for t in tokens if t not in PUNCTUATIONS and t != '"')


def java_available() -> bool:
    """Whether the toolkit's Java programs (PTB tokenizer, METEOR) can run here."""
    return shutil.which("java") is not None


@dataclass
class CaptionScores:
    """Corpus scores as fractions (the toolkit's scale; the paper's tables show them x100)."""

    scores: dict[str, float]
    tokenizer: str  # JAVA_TOKENIZER or PYTHON_TOKENIZER


def _tokenized(captions: Mapping[Hashable, Sequence[str]], java: bool) -> dict[Hashable, list[str]]:
    if not java:
        return {key: [ptb_tokenize(c) for c in texts] for key, texts in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({key: [{"caption": c} for c in texts] for key, texts in captions.items()})


def coco_caption_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], java: bool | None = None
) -> CaptionScores:
    """BLEU-1..4, METEOR (with Java), ROUGE-L and CIDEr-D of one caption per key against its references,
    computed as COCOEvalCap does: both sides PTB-tokenized, then the toolkit's scorers. `java`: None
    picks the Java tokenizer when a Java runtime is found."""
    if not predictions or set(predictions) != set(references):
        raise ValueError("need a prediction for every key with references, and at least one")
    java = java_available() if java is None else java
    hypotheses = {key: [text] for key, text in predictions.items()}
    tokenizer = JAVA_TOKENIZER if java else PYTHON_TOKENIZER
    try:
        refs, hyps = _tokenized(references, java), _tokenized(hypotheses, java)
    except (OSError, subprocess.CalledProcessError) as exc:  # Java found but the toolkit's jar could not run
        log.warning("the Java PTB tokenizer failed (%s); tokenizing in Python", exc)
        java, tokenizer = False, f"Python PTB tokenizer (the Java one failed: {exc}; METEOR left out)"
        refs, hyps = _tokenized(references, False), _tokenized(hypotheses, False)
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    scores.update({f"BLEU-{n + 1}": float(value) for n, value in enumerate(bleu)})
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(refs, hyps)[0])
    scores["ROUGE-L"] = float(Rouge().compute_score(refs, hyps)[0])
    scores["CIDEr"] = float(Cider().compute_score(refs, hyps)[0])
    return CaptionScores(scores, tokenizer)


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Training's validation: corpus CIDEr and BLEU-1..4 of one prediction per item, with the Python
    tokenizer (no Java needed, the same numbers wherever it agrees with the Java one)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need one list of references per prediction, and at least one prediction")
    result = coco_caption_scores(dict(enumerate(predictions)), dict(enumerate(references)), java=False)
    return {k: v for k, v in result.scores.items() if k == "CIDEr" or k.startswith("BLEU")}


# -- VQA ---------------------------------------------------------------------------------------------

_NUMBERS = {
    "none": "0",
    **{w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())},
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, its look-behind typo included
_PERIODS_REMOVED = 32  # the official call passes re.UNICODE (32) where `sub` takes its count: 32 periods at most
# The official table maps a contraction written without one of its apostrophes back to it ("dont" -> "don't",
# "couldn'tve" -> "couldn't've"); its entries are generated from these forms, plus its three odd entries below.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've
we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've
why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're
you've""".split()
_CONTRACTIONS = {
    **{form[:i] + form[i + 1 :]: form for form in _CONTRACTED for i, ch in enumerate(form) if ch == "'"},
    "let's": "let's",
    "she's": "she's",
    "somebody'd": "somebodyd",
}


def _clean(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED)


def _digits_and_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation of one answer: punctuation, number words to digits, no
    articles, apostrophe-less contractions restored."""
    return _digits_and_articles(_punctuation(_clean(answer)))


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official accuracy (0..1) of one prediction against the human answers (ten in VQAv2)."""
    answers = [_clean(a) for a in answers]
    guess = _clean(prediction)
    if len(set(answers)) > 1:  # the official evaluation normalises only when the humans disagree
        answers, guess = [_digits_and_articles(_punctuation(a)) for a in answers], normalize_answer(guess)
    others = [answers[:i] + answers[i + 1 :] for i in range(len(answers))]
    return sum(min(1.0, sum(a == guess for a in rest) / 3) for rest in others) / len(answers)


@dataclass
class VQAScores:
    """The official evaluation's report, in percent rounded to 2 decimals."""

    overall: float
    per_answer_type: dict[str, float] = field(default_factory=dict)
    per_question_type: dict[str, float] = field(default_factory=dict)
    per_question: dict[Hashable, float] = field(default_factory=dict)


def vqa_scores(
    predictions: Mapping[Hashable, str],
    answers: Mapping[Hashable, Sequence[str]],
    answer_types: Mapping[Hashable, str] | None = None,
    question_types: Mapping[Hashable, str] | None = None,
) -> VQAScores:
    """VQAv2 accuracy of `predictions` (question id -> answer) against the ten human answers of each."""
    if not predictions or set(predictions) != set(answers):
        raise ValueError("need a prediction for every question with answers, and at least one")
    accuracy = {key: question_accuracy(predictions[key], answers[key]) for key in answers}

    def by(types: Mapping[Hashable, str] | None) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for key, value in accuracy.items():
            if types is not None and key in types:
                groups.setdefault(types[key], []).append(value)
        return {name: _percent(values) for name, values in groups.items()}

    return VQAScores(
        _percent(list(accuracy.values())),
        by(answer_types),
        by(question_types),
        {key: round(100 * value, 2) for key, value in accuracy.items()},
    )


def _percent(values: Sequence[float]) -> float:
    return round(100 * sum(values) / len(values), 2)


def vqa_accuracy(predictions: list[str], answers: list[list[str]]) -> float:
    """Training's validation: mean accuracy (0..1); `answers[i]` holds item i's reference answers.
    With ten answers it is the official rule; with a single one (a user's data set), the official
    rule would score nothing, so it is exact match after the official normalisation."""
    if len(predictions) != len(answers) or not predictions:
        raise ValueError("need one list of answers per prediction, and at least one prediction")
    total = 0.0
    for prediction, refs in zip(predictions, answers):
        if len(refs) == 1:
            total += float(normalize_answer(prediction) == normalize_answer(refs[0]))
        else:
            total += question_accuracy(prediction, refs)
    return total / len(predictions)


# -- GQA and video QA ---------------------------------------------------------------------------------


def exact_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """GQA's `eval.py` rule (and the video QA sets'): the share of predictions equal to the answer, as strings."""
    if len(predictions) != len(answers) or not predictions:
        raise ValueError("need one answer per prediction, and at least one prediction")
    return sum(p == a for p, a in zip(predictions, answers)) / len(predictions)


def epalm_normalize(answer: str) -> str:
    """eP-ALM's answer normalisation for GQA and video QA: the VQA one, then commas removed."""
    return normalize_answer(answer).replace(",", "")


def normalised_accuracy(predictions: Sequence[str], labels: Sequence[Mapping[str, float]]) -> float:
    """eP-ALM's GQA / video QA score: the normalised prediction looked up among the normalised
    reference answers, scoring that answer's weight (1 for a single answer)."""
    if len(predictions) != len(labels) or not predictions:
        raise ValueError("need the answers of every prediction, and at least one prediction")
    total = 0.0
    for prediction, label in zip(predictions, labels):
        normalised = {epalm_normalize(answer): weight for answer, weight in label.items()}
        total += normalised.get(epalm_normalize(prediction), 0.0)
    return total / len(predictions)


def exact_match(predictions: list[str], targets: list[str]) -> float:
    """Share of predictions equal to their target after stripping and lower-casing."""
    if len(predictions) != len(targets) or not predictions:
        raise ValueError("need one target per prediction, and at least one prediction")
    return sum(p.strip().lower() == t.strip().lower() for p, t in zip(predictions, targets)) / len(predictions)

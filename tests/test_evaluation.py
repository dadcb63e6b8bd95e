"""`python -m epalm eval` end to end in --tiny mode on benchmark files and media written here: the
official results format, the metrics and the paper's numbers, resuming, failures, batching."""

from __future__ import annotations

import json
import threading

import pytest

from epalm.__main__ import main
from epalm.evaluation import Request, predict
from epalm.pipeline import Pipeline

from conftest import VQA_QUESTIONS, write_image


@pytest.fixture()
def coco(tmp_path):
    """Three images and a COCO captions file naming them."""
    folder = tmp_path / "val2014"
    folder.mkdir()
    images, annotations = [], []
    for n, image_id in enumerate((42, 7, 1000)):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        write_image(folder / name, seed=n)
        images.append({"id": image_id, "file_name": name})
        annotations += [
            {"image_id": image_id, "caption": f"a photo {n} of a cat."},
            {"image_id": image_id, "caption": "a dog"},
        ]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path, folder


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_writes_official_results_metrics_and_the_paper_table(coco, tmp_path, capsys):
    """The defaults a user gets: the paper's decoding (3 beams), the Java tokenizer where there is Java."""
    annotations, media = coco
    out = tmp_path / "run"
    code, text, err = run(
        capsys, "eval", "image-caption", "--annotations", annotations, "--media", media, "--out", out, "--tiny"
    )
    assert code == 0, err
    results = json.loads((out / "predictions.json").read_text())
    assert [r["image_id"] for r in results] == [42, 7, 1000] and all(set(r) == {"image_id", "caption"} for r in results)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    record = json.loads((out / "metrics.json").read_text())
    assert record["items"] == record["predicted"] == 3 and record["failed"] == {} and record["random_weights"]
    assert {"CIDEr", "BLEU-4", "ROUGE-L"} <= record["metrics"].keys()
    assert record["paper"] == {"benchmark": "COCO Karpathy test", "metrics": {"CIDEr": 97.22, "BLEU-4": 29.47}}
    assert "image-caption on COCO captions: 3 of 3 items predicted" in text
    assert "paper (COCO Karpathy test)" in text
    cider = next(line for line in text.splitlines() if line.startswith("CIDEr"))
    assert cider.split()[1] == f"{record['metrics']['CIDEr']:.2f}" and cider.split()[2] == "97.22"
    assert "random weights (--tiny)" in text and "captions tokenized by the" in text


def test_eval_vqa_with_an_image_pattern_and_a_limit(vqa, tmp_path, capsys):
    annotations, questions, media = vqa
    args = ["eval", "image-vqa", "--annotations", annotations, "--questions", questions, "--media", media]
    code, text, err = run(
        capsys,
        *args,
        "--out",
        tmp_path / "run",
        "--tiny",
        "--limit",
        "4",
        "--image-pattern",
        "{image_id}.png",
        "--max-new-tokens",
        "3",
    )
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert [r["question_id"] for r in results] == [500, 501, 502, 503] and set(results[0]) == {"question_id", "answer"}
    assert "4 of 4 items predicted" in text and "VQA accuracy" in text and "50.7 / 53.3" in text
    code, _, err = run(capsys, *args, "--out", tmp_path / "other", "--tiny")
    assert code == 2 and "no media found" in err and "--image-pattern" in err, (
        "the default names (COCO_val2014_...) are not there"
    )
    fixed = ["--image-pattern", "{image_id}.png", "--limit", "1", "--max-new-tokens", "2"]
    assert run(capsys, *args, "--out", tmp_path / "other", "--tiny", *fixed)[0] == 0, "the pattern fixed in place"


def test_rerun_skips_what_is_done_and_retries_failures(vqa, tmp_path, capsys):
    annotations, questions, media = vqa
    (media / "2.png").rename(media / "2.png.away")  # questions 502 and 505 are about image 2
    out = tmp_path / "run"

    def args(folder):
        files = ["--annotations", annotations, "--questions", questions, "--media", media, "--out", folder]
        return ["eval", "image-vqa", *files, "--tiny", "--image-pattern", "{image_id}.png", "--max-new-tokens", "3"]

    code, text, err = run(capsys, *args(out))
    assert code == 2, "items failed"
    record = json.loads((out / "metrics.json").read_text())
    assert sorted(record["failed"]) == ["502", "505"] and "File not found" in record["failed"]["502"]
    assert "2 of 6 items failed" in text and record["predicted"] == 4
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 and sum('"error"' in line for line in lines) == 2

    (media / "2.png.away").rename(media / "2.png")
    with (out / "predictions.jsonl").open("a") as log:
        log.write('{"key": 503, "answ')  # a line cut short when a run was killed
    code, text, err = run(capsys, *args(out))
    assert code == 0, err
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 + 1 + 2, "only the two failed questions were asked again"
    assert "6 of 6 items predicted" in text

    fresh = tmp_path / "fresh"
    assert run(capsys, *args(fresh))[0] == 0
    assert json.loads((out / "predictions.json").read_text()) == json.loads((fresh / "predictions.json").read_text())


def test_a_rerun_with_other_settings_or_a_task_that_does_not_fit_is_refused(vqa, tmp_path, capsys):
    annotations, questions, media = vqa

    def args(task, out, *more):
        files = ["--annotations", annotations, "--questions", questions, "--media", media, "--out", tmp_path / out]
        return ["eval", task, *files, "--tiny", "--image-pattern", "{image_id}.png", *more]

    assert run(capsys, *args("image-vqa", "run", "--max-new-tokens", "2", "--limit", "1"))[0] == 0
    code, _, err = run(capsys, *args("image-vqa", "run", "--max-new-tokens", "3"))
    assert code == 2 and "made with other settings (decoding)" in err
    code, _, err = run(capsys, *args("image-vqa", "run", "--max-new-tokens", "2", "--dtype", "bfloat16"))
    assert code == 2 and "made with other settings (dtype)" in err
    code, _, err = run(capsys, *args("video-qa-msrvtt", "other"))
    assert code == 2 and "holds VQAv2 (answers to questions about image); 'video-qa-msrvtt' writes answers" in err
    code, _, err = run(capsys, *args("image-vqa", "third", "--limit", "0"))
    assert code == 2 and "--limit must be at least 1" in err


def test_predict_shares_the_pipelines_decode_steps(vqa):
    """Requests reach the scheduler together (their 3-beam rows share steps), and each gets the answer
    it gets alone."""
    _, _, media = vqa
    pipe = Pipeline(tiny=True)
    requests = [Request(n, str(media / f"{n % 3}.png"), VQA_QUESTIONS[n % 4]) for n in range(6)]
    lm = pipe.lm(pipe.task("image-vqa"))[0]
    rows: list[int] = []
    pipe.scheduler(lm).callback = rows.append
    threads_seen = set()
    stream = pipe.stream

    def watched(*args, **kwargs):
        threads_seen.add(threading.get_ident())
        return stream(*args, **kwargs)

    pipe.stream = watched
    found = {p.key: p for p in predict(pipe, "image-vqa", requests, {"max_new_tokens": 4})}
    assert sorted(found) == list(range(6)) and all(p.error is None for p in found.values())
    assert max(rows) > 3, "several 3-beam requests in one step"
    assert len(threads_seen) > 1, "submitted from several threads"
    pipe.stream = stream
    for n in (0, 5):
        alone = pipe.answer(requests[n].media, requests[n].question, "image-vqa", max_new_tokens=4).text
        assert found[n].answer == alone

"""The benchmarks' own annotation files, each in its published form (small copies written here), read
into items, written back in the official results format, and scored by their rules."""

from __future__ import annotations

import json

import pytest

from epalm.benchmarks import BenchmarkError, read_benchmark

from conftest import ROOT

VQA = json.loads((ROOT / "tests" / "fixtures" / "metrics" / "vqa_official.json").read_text())


def write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_coco_captions_file(tmp_path):
    data = {
        "images": [{"id": 9, "file_name": "COCO_val2014_000000000009.jpg"}, {"id": 25, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 9, "caption": "A cat."},
            {"image_id": 25, "caption": "A dog."},
            {"image_id": 9, "caption": "a kitten"},
        ],
    }
    bench = read_benchmark(write(tmp_path / "captions_val2014.json", data), tmp_path / "val2014")
    assert (bench.name, bench.kind, bench.modality, bench.scoring) == ("COCO captions", "caption", "image", "caption")
    assert [(i.key, i.media.name, i.references) for i in bench.items] == [
        (9, "COCO_val2014_000000000009.jpg", ("A cat.", "a kitten")),
        (25, "b.jpg", ("A dog.",)),
    ]
    assert bench.items[0].media.parent == tmp_path / "val2014"
    assert bench.results({9: "a cat", 25: "a dog"}) == [
        {"image_id": 9, "caption": "a cat"},
        {"image_id": 25, "caption": "a dog"},
    ]


def test_coco_ground_truth_without_file_names_needs_a_pattern(tmp_path):
    """BLIP's coco_karpathy_test_gt.json names no files: the error says how to name them."""
    path = write(
        tmp_path / "gt.json", {"images": [{"id": 391895}], "annotations": [{"image_id": 391895, "caption": "x"}]}
    )
    with pytest.raises(BenchmarkError, match=r"--image-pattern.*\{image_id\}"):
        read_benchmark(path, tmp_path)
    bench = read_benchmark(path, tmp_path, image_pattern="val2014/COCO_val2014_{image_id:012d}.jpg")
    assert bench.items[0].media == tmp_path / "val2014" / "COCO_val2014_000000391895.jpg"


def test_karpathy_split_file_reads_one_split(tmp_path):
    def image(cocoid, split):
        name = f"COCO_val2014_{cocoid:012d}.jpg"
        sentences = [{"raw": f"caption {cocoid} {n}"} for n in range(5)]
        return {"filepath": "val2014", "filename": name, "cocoid": cocoid, "split": split, "sentences": sentences}

    images = [image(1, "train"), image(2, "test"), image(3, "restval"), image(4, "val"), image(5, "test")]
    path = write(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    test = read_benchmark(path, tmp_path)
    assert [i.key for i in test.items] == [2, 5] and len(test.items[0].references) == 5
    assert test.items[0].media == tmp_path / "val2014" / "COCO_val2014_000000000002.jpg"
    assert [i.key for i in read_benchmark(path, tmp_path, split="train").items] == [1, 3], "restval is train"
    with pytest.raises(BenchmarkError, match="no .* items in split 'dev'"):
        read_benchmark(path, tmp_path, split="dev")


def test_blip_karpathy_test_list(tmp_path):
    data = [
        {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["a man on a moped", "a dirt road"]},
        {"image": "val2014/COCO_val2014_000000060623.jpg", "caption": ["a girl eating"]},
    ]
    bench = read_benchmark(write(tmp_path / "coco_karpathy_test.json", data), tmp_path)
    assert [(i.key, str(i.media.relative_to(tmp_path))) for i in bench.items] == [
        (391895, "val2014/COCO_val2014_000000391895.jpg"),
        (60623, "val2014/COCO_val2014_000000060623.jpg"),
    ]


def test_vqav2_questions_and_annotations(tmp_path):
    annotations = write(tmp_path / "annotations.json", VQA["annotations"])
    questions = write(tmp_path / "questions.json", VQA["questions"])
    bench = read_benchmark(annotations, tmp_path, questions)
    first = bench.items[0]
    assert (bench.name, bench.scoring, bench.id_field, bench.text_field) == ("VQAv2", "vqa", "question_id", "answer")
    assert first.key == 1000 and first.question == "question 0?" and len(first.references) == 10
    assert first.media == tmp_path / "COCO_val2014_000000000042.jpg", "named by id, as VQAv2's images are"
    named = read_benchmark(annotations, tmp_path, questions, image_pattern="{image_id}.png")
    assert named.items[0].media == tmp_path / "42.png"
    with pytest.raises(BenchmarkError, match="questions file: give the annotations file"):
        read_benchmark(questions, tmp_path)
    with pytest.raises(BenchmarkError, match="need its questions file"):
        read_benchmark(annotations, tmp_path)
    with pytest.raises(BenchmarkError, match=r"does not fit this file .*fields: \{image_id\}, \{question_id\}"):
        read_benchmark(annotations, tmp_path, questions, image_pattern="{cocoid}.jpg")


def test_vqav2_scores_are_the_official_evaluations_through_the_reader(tmp_path):
    bench = read_benchmark(
        write(tmp_path / "a.json", VQA["annotations"]), tmp_path, write(tmp_path / "q.json", VQA["questions"])
    )
    scores, notes = bench.score({p["question_id"]: p["answer"] for p in VQA["predictions"]})
    assert scores["VQA accuracy"] == VQA["expected"]["overall"]
    for answer_type, value in VQA["expected"]["perAnswerType"].items():
        assert scores[f"VQA accuracy ({answer_type})"] == value
    missing = bench.score({p["question_id"]: p["answer"] for p in VQA["predictions"][1:]})[0]["VQA accuracy"]
    assert missing < scores["VQA accuracy"], "a question without a prediction scores as wrong"


def test_gqa_questions_balanced_only_and_scored_both_ways(tmp_path):
    def question(image, text, answer, balanced=True, structural="query"):
        return {
            "imageId": image,
            "question": text,
            "answer": answer,
            "isBalanced": balanced,
            "types": {"structural": structural},
        }

    data = {
        "201307251": question("n7768", "What is the cup on?", "table"),
        "201640614": question("n1234", "Is it red?", "yes", structural="verify"),
        "20968379": question("n7768", "Who wears the hat?", "man", balanced=False),
    }
    bench = read_benchmark(write(tmp_path / "testdev_balanced_questions.json", data), tmp_path)
    assert [(i.key, i.media.name, i.answer_type) for i in bench.items] == [
        ("201307251", "n7768.jpg", "open"),
        ("201640614", "n1234.jpg", "binary"),
    ]
    assert bench.results({"201307251": "table"}) == [{"questionId": "201307251", "prediction": "table"}]
    scores, _ = bench.score({"201307251": "the table", "201640614": "yes"})
    assert scores["accuracy"] == 50.0, "GQA's eval.py: exact strings"
    assert scores["accuracy (normalised)"] == 100.0, "eP-ALM's rule: the article goes"
    assert scores["accuracy (open)"] == 0.0 and scores["accuracy (binary)"] == 100.0


def test_msrvtt_captions_test_split(tmp_path):
    data = {
        "videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video7010", "split": "test"}],
        "sentences": [
            {"video_id": "video7010", "caption": "a man is talking", "sen_id": 1},
            {"video_id": "video0", "caption": "a car", "sen_id": 2},
            {"video_id": "video7010", "caption": "someone talks", "sen_id": 3},
        ],
    }
    bench = read_benchmark(write(tmp_path / "test_videodatainfo.json", data), tmp_path)
    assert (bench.modality, bench.kind) == ("video", "caption")
    assert [(i.key, i.media.name, i.references) for i in bench.items] == [
        ("video7010", "video7010.mp4", ("a man is talking", "someone talks"))
    ]


def test_published_video_qa_msrvtt_and_msvd(tmp_path):
    rows = [{"answer": "cooking", "id": 0, "question": "what is a woman doing", "video_id": 7010}]
    bench = read_benchmark(write(tmp_path / "test_qa.json", rows), tmp_path / "video")
    assert bench.name == "MSRVTT-QA" and bench.items[0].media == tmp_path / "video" / "video7010.mp4"
    assert bench.results({0: "cooking"}) == [{"question_id": 0, "answer": "cooking"}]
    msvd = tmp_path / "msvd"
    msvd.mkdir()
    (msvd / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n00jrXRMlZOY_0_10 vid7010\n")
    bench = read_benchmark(write(msvd / "test_qa.json", rows), tmp_path / "YouTubeClips")
    assert bench.name == "MSVD-QA" and bench.items[0].media.name == "00jrXRMlZOY_0_10.avi"


def test_epalm_labelled_qa_file(tmp_path):
    rows = [{"video": "2375429.mp4", "label": {"pipe": 1.0, "tube": 0.3}, "question_id": "07333408", "sent": "what?"}]
    bench = read_benchmark(write(tmp_path / "msrvtt_vqa_test.json", rows), tmp_path)
    item = bench.items[0]
    assert (item.key, item.media.name, item.question, item.references) == (
        "07333408",
        "2375429.mp4",
        "what?",
        ("pipe", "tube"),
    )
    assert bench.score({"07333408": "tube"})[0] == {"accuracy": 0.0, "accuracy (normalised)": pytest.approx(30.0)}


def test_audiocaps_csv_one_item_per_clip(tmp_path):
    csv = (
        "audiocap_id,youtube_id,start_time,caption\n103549,7fmOlUlwoNg,20,A man talks\n103548,7fmOlUlwoNg,20,Talking\n"
    )
    csv += "103541,-0xz5WV4e3U,30,Birds chirp\n"
    path = write(tmp_path / "test.csv", csv)
    bench = read_benchmark(path, tmp_path)
    assert (bench.name, bench.modality) == ("AudioCaps captions", "audio")
    assert [(i.key, i.media.name, i.references) for i in bench.items] == [
        ("7fmOlUlwoNg", "7fmOlUlwoNg.wav", ("A man talks", "Talking")),
        ("-0xz5WV4e3U", "-0xz5WV4e3U.wav", ("Birds chirp",)),
    ]
    named = read_benchmark(path, tmp_path, image_pattern="Y{youtube_id}_{start_time}.wav")
    assert named.items[1].media.name == "Y-0xz5WV4e3U_30.wav"


def test_epalm_audio_and_video_caption_lists(tmp_path):
    audio = [{"audio": "test/Y7fmOlUlwoNg.wav", "caption": "A man talks"}]
    assert read_benchmark(write(tmp_path / "audiocaps_caption_test.json", audio), tmp_path).modality == "audio"
    video = [{"video": "video7010.mp4", "caption": ["a", "b"]}, {"video": "video7010.mp4", "caption": "c"}]
    bench = read_benchmark(write(tmp_path / "msrvtt_caption_test.json", video), tmp_path)
    assert [(i.key, i.references) for i in bench.items] == [("video7010", ("a", "b", "c"))]


def test_unreadable_files_say_so(tmp_path):
    with pytest.raises(BenchmarkError, match="cannot read"):
        read_benchmark(tmp_path / "missing.json", tmp_path)
    with pytest.raises(BenchmarkError, match="neither JSON nor CSV"):
        read_benchmark(write(tmp_path / "bad.json", "{not json"), tmp_path)
    with pytest.raises(BenchmarkError, match="not an annotation file"):
        read_benchmark(write(tmp_path / "other.json", {"something": 1}), tmp_path)
    with pytest.raises(BenchmarkError, match="--questions is for VQAv2"):
        data = [{"image": "a.jpg", "caption": "x"}]
        read_benchmark(
            write(tmp_path / "c.json", data), tmp_path, questions=write(tmp_path / "q.json", VQA["questions"])
        )

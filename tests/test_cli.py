"""`python -m epalm` end to end in --tiny mode on media the test writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from epalm.__main__ import main

from conftest import PARITY_CASES, ROOT


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**__import__("os").environ, **env}
    return subprocess.run([sys.executable, "-m", "epalm", *args], capture_output=True, text=True, cwd=ROOT, env=environment, timeout=600)


def test_caption_batch_keeps_order_and_survives_bad_files(media_files, tmp_path):
    missing, corrupt = tmp_path / "missing.jpg", tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not really a jpeg")
    paths = [str(media_files["image"]), str(missing), str(corrupt), str(media_files["image"])]
    out = run("caption", "--tiny", "--task", "image-caption", "--preset", "fast", "--max-new-tokens", "5", *paths)
    assert out.returncode == 2, out.stderr
    lines = out.stdout.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == paths
    assert "ERROR:" not in lines[0] and lines[0] == lines[3], "same file, same answer"
    assert lines[1].split("\t")[1].startswith("ERROR: ") and lines[2].split("\t")[1].startswith("ERROR: ")
    assert "Traceback" not in out.stdout + out.stderr


def test_ask_jsonl_on_video_and_audio(media_files):
    out = run("ask", "--tiny", "--task", "video-qa-msrvtt", "-q", "what is happening", "--jsonl", "--beams", "2", str(media_files["video"]))
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["path"] == str(media_files["video"]) and isinstance(record["answer"], str) and "timings" in record
    assert main(["caption", "--tiny", "--task", "audio-caption", "--preset", "fast", "--max-new-tokens", "3", str(media_files["audio"])]) == 0


def test_save_inputs_writes_what_the_model_saw_per_file(media_files, tmp_path, capsys):
    out = tmp_path / "seen"
    paths = [str(media_files["image"]), str(media_files["video"]), str(media_files["image"])]
    argv = ["ask", "--tiny", "--task", "image-vqa", "-q", "what is it", "--beams", "2", "--max-length", "12", "--jsonl"]
    assert main([*argv, "--save-inputs", str(out), paths[0], paths[2]]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    name = media_files["image"].name
    assert [r["inputs"] for r in records] == [str(out / name), str(out / f"{name}-2")], "same name twice: two folders"
    data = json.loads((out / name / "inspection.json").read_text())
    assert data["answer"] == records[0]["answer"] and data["prompt"].endswith("what is it??</a>")
    assert len(data["beams"]) == 2 and data["tokens"] == data["beams"][0]["tokens"]
    assert data["seen"]["files"] == ["input.png"] and data["decoding"]["strategy"] == "beam search"
    assert Image.open(out / name / "input.png").size == (224, 224)
    assert main(["caption", "--tiny", "--task", "video-caption", "--preset", "fast", "--max-new-tokens", "2",
                 "--frames", "4", "--save-inputs", str(out), paths[1]]) == 0
    assert sorted(p.name for p in (out / media_files["video"].name).iterdir()) == [
        "frame01.png", "frame02.png", "frame03.png", "frame04.png", "inspection.json"
    ]


def test_ask_without_question_text_fails_cleanly(media_files, capsys):
    assert main(["ask", "--tiny", "--task", "image-vqa", "-q", " ", str(media_files["image"])]) == 2
    assert "Please type a question" in capsys.readouterr().out


def test_tasks_table_lists_every_task_and_cache_state(tmp_path):
    out = run("tasks", HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.strip().split("\n")
    assert rows[0].startswith("task") and len(rows) == 11
    assert all("no/no/no" in row for row in rows[1:])


def test_convert_writes_our_format(tmp_path):
    case = PARITY_CASES[0]
    out_dir = tmp_path / "converted"
    # the fixtures' shapes are not the registry's: conversion keeps tensors as they are
    assert main(["convert", str(case / "adapters.pth"), str(out_dir), "--task", "image-caption"]) == 0
    assert (out_dir / "adapter.safetensors").is_file() and (out_dir / "adapter_config.json").is_file()
    card = (out_dir / "README.md").read_text()
    assert "facebook/opt-2.7b" in card and "image-caption" in card
    from safetensors.torch import load_file

    original = torch.load(case / "adapters.pth", weights_only=True)["model"]
    assert all(torch.equal(load_file(out_dir / "adapter.safetensors")[k], v) for k, v in original.items())


def test_unknown_task_is_an_error_not_a_traceback(media_files):
    out = run("caption", "--tiny", "--task", "nope", str(media_files["image"]))
    assert out.returncode == 2 and "unknown task 'nope'" in out.stdout and "Traceback" not in out.stderr


@pytest.mark.parametrize("argv", [["parity", str(PARITY_CASES[0])]])
def test_parity_subcommand(argv):
    assert main(argv) == 0


def test_a_long_question_says_its_answer_limit_was_raised(media_files, capsys):
    question = "what is the man holding in the picture and why " * 3
    path = str(media_files["image"])
    assert main(["ask", "--tiny", "--task", "image-vqa", "-q", question, path]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"{path}\t") and "note:" not in out.out
    assert f"note: {path}: Long question" in out.err and "--max-new-tokens N" in out.err
    assert main(["ask", "--tiny", "--task", "image-vqa", "-q", question, "--jsonl", "--preset", "fast", path]) == 0
    assert "up to 8 new tokens" in json.loads(capsys.readouterr().out)["notice"]

"""`python -m epalm` end to end in --tiny mode on media the test writes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

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


def test_ask_without_question_text_fails_cleanly(media_files, capsys):
    assert main(["ask", "--tiny", "--task", "image-vqa", "-q", " ", str(media_files["image"])]) == 2
    assert "Please type a question" in capsys.readouterr().out


def test_an_image_given_to_a_video_task_is_refused_as_in_the_library(media_files, capsys):
    assert main(["caption", "--tiny", "--task", "video-caption", str(media_files["image"])]) == 2
    message = "This file is a still image (mjpeg), not a video: use an image task for it."
    assert capsys.readouterr().out == f"{media_files['image']}\tERROR: {message}\n"


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


def test_an_unknown_task_is_one_usage_error_before_any_file(media_files, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["caption", "--tiny", "--task", "nope", str(media_files["image"]), str(media_files["video"])])
    out = capsys.readouterr()
    assert exit.value.code == 2 and out.out == "" and out.err.count("unknown task 'nope'") == 1
    assert out.err.startswith("usage: ") and "known tasks: image-caption, " in out.err


@pytest.mark.parametrize(
    "argv, message",
    [(["ask", "-q", "what is it?", "--task", "image-caption"], "'image-caption' writes captions and takes no question: "
      "use `caption`, or ask with one of: image-vqa, image-gqa"),
     (["caption", "--task", "video-qa-msvd"], "'video-qa-msvd' answers questions: use `ask --question ...`")],
)
def test_a_task_of_the_other_kind_is_a_usage_error(media_files, capsys, argv, message):
    with pytest.raises(SystemExit):
        main([*argv, "--tiny", str(media_files["image"])])
    assert message in capsys.readouterr().err


def test_verbose_shows_the_traceback_of_an_unexpected_error(media_files, monkeypatch, caplog, capsys):
    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr("epalm.pipeline.Pipeline.caption", broken)
    caplog.set_level(logging.INFO)  # what -v sets (in a test, logging is pytest's already)
    assert main(["-v", "caption", "--tiny", "--task", "image-caption", str(media_files["image"])]) == 2
    assert capsys.readouterr().out.endswith("\tERROR: KeyError: 'boom'\n")
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.levelno == logging.INFO and record.exc_info[0] is KeyError, "logged with its traceback, shown by -v"


@pytest.mark.parametrize("argv", [["parity", str(PARITY_CASES[0])]])
def test_parity_subcommand(argv):
    assert main(argv) == 0

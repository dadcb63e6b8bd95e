"""`python -m epalm` end to end in --tiny mode on media the test writes (in-process through main();
a fresh process only where the process itself is what is tested)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from epalm.__main__ import main
from epalm.adapters import shown

from conftest import PARITY_CASES, ROOT


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command, flag", [("caption", "--max-new-tokens"), ("train", "--no-init-from-base")])
def test_help_answers_without_importing_the_library(command, flag):
    """`python -m epalm ... --help` (and usage errors) must not wait for torch, transformers, datasets or gradio."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['epalm', '{command}', '--help']\n"
        "try:\n    runpy.run_module('epalm', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'gradio') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert flag in out.stdout and out.stdout.rstrip().endswith("[]"), out.stdout


@pytest.mark.parametrize(
    "argv, status, shown",
    [
        (["caption", "--help"], 0, "--max-new-tokens"),
        (["tasks"], 0, "image-caption    image     caption  facebook/opt-2.7b"),
        (["caption", "photo.jpg"], 2, "name a task (--task) or a trained adapter (--adapter)"),
        (["ask", "-q", "what?", "--task", "nope", "photo.jpg"], 2, "unknown task 'nope'"),
    ],
    ids=["help", "tasks", "caption-without-task", "unknown-task"],
)
def test_answers_that_need_no_model_come_without_importing_the_library(argv, status, shown):
    """`--help`, `tasks` and usage errors must not wait for torch, transformers, timm or gradio (seconds)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['epalm', *{argv!r}]\n"
        "try:\n    runpy.run_module('epalm', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n    print('status', exc.code)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'timm', 'gradio') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert f"status {status}" in out.stdout and shown in out.stdout + out.stderr, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("[]"), out.stdout


def test_tiny_answers_print_no_control_characters_and_the_log_says_what_loads(media_files, monkeypatch, capsys, caplog):
    """Random weights can decode to any bytes, escape sequences included: the terminal gets them escaped."""
    from epalm.pipeline import Answer, Pipeline

    stream = Pipeline.stream

    def control_bytes(self, *args, **kwargs):
        *partial, final = stream(self, *args, **kwargs)
        yield Answer("a \x1b[2Jcat\x00 on\x07 a mat\u200b", final.task, True, final.timings)

    monkeypatch.setattr(Pipeline, "stream", control_bytes)
    caplog.set_level(logging.INFO)
    assert main(["-v", "caption", "--tiny", "--task", "image-caption", str(media_files["image"])]) == 0
    out = capsys.readouterr().out
    assert out == f"{media_files['image']}\ta \\x1b[2Jcat\\x00 on\\x07 a mat\\u200b\n"
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Loading")]
    assert stages[0] == "Loading OPT-2.7B language model (tiny random stand-in)…", stages


def test_help_describes_every_decoding_flag_and_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    text = capsys.readouterr().out
    entries = dict(re.findall(r"^  (-[-\w]+)(.*(?:\n {6,}.*)*)", text, flags=re.MULTILINE))  # option -> its help
    flags = ["--preset", "--beams", "--sample", "--temperature", "--top-p", "--top-k", "--seed", "--max-new-tokens"]
    for flag in [*flags, "--max-length"]:
        assert len(entries[flag].split()) > 4, f"{flag} is not described: {entries[flag]!r}"
    text = " ".join(text.split())
    for default in ("(default: auto)", "(default: 200)", "(paper: 3)", "(paper: 30)", "(default: 1.0)"):
        assert default in text


def test_caption_batch_keeps_order_and_survives_bad_files(media_files, tmp_path, capsys):
    missing, corrupt = tmp_path / "missing.jpg", tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not really a jpeg")
    paths = [str(media_files["image"]), str(missing), str(corrupt), str(media_files["image"])]
    fast = ["--preset", "fast", "--max-new-tokens", "5"]
    code, out, err = run(capsys, "caption", "--tiny", "--task", "image-caption", *fast, *paths)
    assert code == 2, err
    lines = out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == paths
    assert "ERROR:" not in lines[0] and lines[0] == lines[3], "same file, same answer"
    assert lines[1].split("\t")[1].startswith("ERROR: ") and lines[2].split("\t")[1].startswith("ERROR: ")
    assert "Traceback" not in out + err


def test_ask_jsonl_on_video_and_audio(media_files, capsys):
    question = ["-q", "what is happening", "--jsonl", "--beams", "2"]
    code, out, err = run(capsys, "ask", "--tiny", "--task", "video-qa-msrvtt", *question, str(media_files["video"]))
    assert code == 0, err
    record = json.loads(out)
    assert record["path"] == str(media_files["video"]) and isinstance(record["answer"], str) and "timings" in record
    assert (
        main(
            [
                "caption",
                "--tiny",
                "--task",
                "audio-caption",
                "--preset",
                "fast",
                "--max-new-tokens",
                "3",
                str(media_files["audio"]),
            ]
        )
        == 0
    )


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
    assert (
        main(
            [
                "caption",
                "--tiny",
                "--task",
                "video-caption",
                "--preset",
                "fast",
                "--max-new-tokens",
                "2",
                "--frames",
                "4",
                "--save-inputs",
                str(out),
                paths[1],
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (out / media_files["video"].name).iterdir()) == [
        "frame01.png",
        "frame02.png",
        "frame03.png",
        "frame04.png",
        "inspection.json",
    ]


def test_ask_without_question_text_fails_cleanly(media_files, capsys):
    assert main(["ask", "--tiny", "--task", "image-vqa", "-q", " ", str(media_files["image"])]) == 2
    assert "Please type a question" in capsys.readouterr().out


def test_an_image_given_to_a_video_task_is_refused_as_in_the_library(media_files, capsys):
    assert main(["caption", "--tiny", "--task", "video-caption", str(media_files["image"])]) == 2
    message = "This file is a still image (mjpeg), not a video: use an image task for it."
    assert capsys.readouterr().out == f"{media_files['image']}\tERROR: {message}\n"


def test_tasks_table_lists_every_task_and_cache_state(fake_hub, capsys):
    code, out, err = run(capsys, "tasks")  # fake_hub: an empty private cache
    assert code == 0, err
    rows = out.strip().split("\n")
    assert rows[0].startswith("task") and len(rows) == 11
    assert all("no/no/no" in row for row in rows[1:])


def test_convert_writes_our_format(tmp_path):
    """A checkpoint at the task's real shapes (image-caption-L: ViT-L/16 into OPT-6.7B), tensors kept as they are."""
    from safetensors.torch import load_file

    from epalm.adapter_format import ENCODER_SHAPES, LM_SHAPES
    from epalm.model import Adapter
    from epalm.tasks import load_registry

    task = load_registry()["image-caption-L"]
    widths = ENCODER_SHAPES[task.encoder.id][0], *LM_SHAPES[task.lm.id][:2]
    original = {k: torch.randn_like(v) for k, v in Adapter(task.injection, *widths).state_dict().items()}
    torch.save({"model": original, "epoch": 3}, tmp_path / "checkpoint_best.pth")
    out_dir = tmp_path / "converted"
    assert main(["convert", str(tmp_path / "checkpoint_best.pth"), str(out_dir), "--task", "image-caption-L"]) == 0
    assert (out_dir / "adapter.safetensors").is_file() and (out_dir / "adapter_config.json").is_file()
    card = (out_dir / "README.md").read_text()
    assert "facebook/opt-6.7b" in card and "image-caption-L" in card
    assert all(torch.equal(load_file(out_dir / "adapter.safetensors")[k], v) for k, v in original.items())


def test_convert_refuses_what_does_not_fit_and_says_why(tmp_path, capsys):
    """The issue's cases, through the CLI: an empty file, a device, tensors of other models, NaN weights."""
    (tmp_path / "empty.pth").write_bytes(b"")
    case = ROOT / "tests" / "fixtures" / "parity" / "audio_caption" / "adapters.pth"  # the registry's injection
    state = torch.load(case, weights_only=True)
    state["model"]["connector.0.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    registry = tmp_path / "tasks.yaml"  # the fixture's own models: checked against its own widths
    text = (ROOT / "checkpoints" / "tasks.yaml").read_text()
    registry.write_text(text.replace("id: facebook/opt-2.7b", "id: test/fixture-opt"))
    fixture_task = ["--task", "audio-caption", "--registry", str(registry)]
    for src, flags, message in [
        (tmp_path / "empty.pth", ["--task", "image-caption"], "empty.pth is empty (0 bytes): not a checkpoint."),
        ("/dev/zero", ["--task", "image-caption"], "/dev/zero is a character device, not a checkpoint file."),
        (case, ["--task", "image-caption"], "adapters.pth does not fit the task 'image-caption': its tensors are"),
        (tmp_path / "nan.pth", fixture_task, "connector.0.bias holds NaN or infinite values."),
    ]:
        code, out, err = run(capsys, "convert", str(src), str(tmp_path / "out"), *flags)
        assert code == 2 and out == "" and err.startswith("error: ") and message in err, err
        assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    code, out, err = run(capsys, "convert", str(case), str(tmp_path / "out"), *fixture_task)
    assert code == 0 and (tmp_path / "out" / "adapter.safetensors").is_file(), err


def test_media_paths_that_are_not_files_say_what_they_are(tmp_path, capsys):
    code, out, err = run(capsys, "caption", "--tiny", "--task", "image-caption", "/dev/zero")
    assert code == 2 and out == "/dev/zero\tERROR: This is a character device, not a file: /dev/zero\n", err


def test_an_unknown_task_is_one_usage_error_before_any_file(media_files, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["caption", "--tiny", "--task", "nope", str(media_files["image"]), str(media_files["video"])])
    out = capsys.readouterr()
    assert exit.value.code == 2 and out.out == "" and out.err.count("unknown task 'nope'") == 1
    assert out.err.startswith("usage: ") and "known tasks: image-caption, " in out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["ask", "-q", "what is it?", "--task", "image-caption"],
            "'image-caption' writes captions and takes no question: "
            "use `caption`, or ask with one of: image-vqa, image-gqa",
        ),
        (["caption", "--task", "video-qa-msvd"], "'video-qa-msvd' answers questions: use `ask --question ...`"),
    ],
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


def test_a_long_question_says_its_answer_limit_was_raised(media_files, capsys):
    question = "what is the man holding in the picture and why " * 3
    path = str(media_files["image"])
    assert main(["ask", "--tiny", "--task", "image-vqa", "-q", question, path]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"{path}\t") and "note:" not in out.out
    assert f"note: {path}: Long question" in out.err and "--max-new-tokens N" in out.err
    assert main(["ask", "--tiny", "--task", "image-vqa", "-q", question, "--jsonl", "--preset", "fast", path]) == 0
    assert "up to 8 new tokens" in json.loads(capsys.readouterr().out)["notice"]


def test_train_flags_leave_every_default_to_the_library():
    """No flag restates a default: every flag the user leaves out is None, so `TrainConfig` and the recipe decide."""
    from dataclasses import fields

    from epalm.__main__ import build_parser
    from epalm.training import TrainConfig

    args = vars(build_parser().parse_args(["train", "data", "--base", "image-caption", "--out", "out"]))
    flags = {k: v for k, v in args.items() if k not in ("command", "verbose", "data", "base", "out")}
    assert set(flags) <= {f.name for f in fields(TrainConfig)}, "each flag sets a TrainConfig field"
    assert len(flags) > 30 and {k: v for k, v in flags.items() if v is not None} == {}


def test_an_adapter_of_the_other_kind_points_to_the_right_command(media_files, tmp_path, capsys):
    from epalm.training import train

    from conftest import write_colour_folder

    data = write_colour_folder(tmp_path / "colours", per_colour=2, qa=True)
    train(data, "image-vqa", tmp_path / "qa-adapter", tiny=True, recipe="paper", epochs=1, progress=False)
    adapter = str(tmp_path / "qa-adapter")
    code, out, err = run(capsys, "caption", "--tiny", "--adapter", adapter, str(data / "red_0.png"))
    assert code == 2 and out == ""
    assert err == (
        f"error: The adapter {shown(str(tmp_path / 'qa-adapter'))} was trained for image question answering, not image "
        "captioning: use it to answer questions about images.\n"
    )

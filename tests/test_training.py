"""Training: with the defaults a user gets, tiny models learn a synthetic task of every modality, and
the adapter they write is used by the Python API, the CLI and a registry entry alike. Runs can be
interrupted and resumed to the adapter, log and model card of an uninterrupted run, bit for bit,
and never half-replace the adapter already in their output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epalm.__main__ import main
from epalm.pipeline import Pipeline
from epalm.tasks import load_registry
from epalm.training import TIMING, AdapterLoss, Trainer, TrainingInterrupted, train

from conftest import ROOT, FakeHub, write_colour_folder

# base task -> (file suffix, files per colour, the question of a QA task); video decodes slowly. Image
# captions are learnt by `python -m epalm train` with its default flags (the fixture `cli_adapter`).
TASKS = {
    "image-vqa": (".png", 8, "what colour is it"),
    "audio-caption": (".wav", 8, None),
    "video-caption": (".mp4", 6, None),
}
# a short run by the paper's recipe (LM dropout on): 7 training files, 4 steps an epoch, 1 validation file
PAPER = dict(recipe="paper", epochs=3, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(device="cpu", tiny=True, pack_weights=False)


def held_out_exact_match(pipe: Pipeline, folder: Path, question: str | None = None, **using) -> float:
    """Share of the folder's files answered exactly, with the task's own decoding (as the CLI and app answer)."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    hits = 0
    for row in rows:
        path = folder / row["file_name"]
        answer = pipe.answer(path, question, **using) if question else pipe.caption(path, **using)
        hits += answer.text == row.get("text", row.get("answer"))
    return hits / len(rows)


@pytest.mark.parametrize("base", list(TASKS))
def test_default_settings_learn_a_task_of_each_modality(pipe, tmp_path, base):
    suffix, per_colour, question = TASKS[base]
    data = write_colour_folder(tmp_path / "data", per_colour=per_colour, suffix=suffix, qa=bool(question))
    held_out = write_colour_folder(tmp_path / "held_out", per_colour=3, suffix=suffix, qa=bool(question), seed=1000)
    result = train(data, base, tmp_path / "adapter", pipeline=pipe, progress=False)
    plan = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["training"]["plan"]
    assert plan["recipe"] == "small" and plan["init_from_base"] and plan["total_steps"] >= 300
    assert result.improved and result.best > result.baseline == 0.0
    assert "before training (the base task's adapter, on the same validation rows)" in result.summary
    assert held_out_exact_match(pipe, held_out, question, adapter=str(tmp_path / "adapter")) >= 0.9
    assert held_out_exact_match(pipe, held_out, question, task=base) <= 0.25, "the adapter it started from"


@pytest.fixture(scope="module")
def cli_adapter(tmp_path_factory) -> tuple[Path, Path]:
    """An image-caption adapter written by `python -m epalm train` with default flags (and --tiny), and
    a folder of held-out files."""
    root = tmp_path_factory.mktemp("cli")
    data = write_colour_folder(root / "colours", per_colour=8)
    held_out = write_colour_folder(root / "held_out", per_colour=3, seed=1000)
    argv = ["train", str(data), "--base", "image-caption", "--out", str(root / "colours-adapter"), "--tiny"]
    assert main([*argv, "--no-progress"]) == 0
    return root / "colours-adapter", held_out


def test_a_cli_trained_adapter_answers_alike_in_the_python_api_the_cli_and_a_registry_entry(cli_adapter, capsys):
    out, held_out = cli_adapter
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_task"] == "image-caption" and config["tiny"] and config["training"]["finished"]
    assert config["training"]["plan"]["recipe"] == "small" and config["training"]["plan"]["init_from_base"]
    assert config["training"]["summary"].startswith("Best CIDEr 5.0000 at epoch ")
    assert (
        "up from 0.0000 before training (the base task's adapter, on the same validation rows)"
        in (config["training"]["summary"])
    )
    assert config["label"] == "COCO captions, trained on colours", "its own menu label"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: epalm-demo\n") and "\n- Encoder (frozen): `" in card
    assert "## Recipe\nSized in optimizer steps for small data (docs/training.md), because the paper's recipe " in card
    assert "## Result\nBest CIDEr" in card
    assert "| 0 (before training) | |" in card and not (out / "last").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log[:2]] == ["start", "baseline"] and log[-1]["event"] == "end"
    epochs = [r["epoch"] for r in log if r["event"] == "epoch"]
    assert epochs == list(range(1, len(epochs) + 1)) == list(range(1, log[0]["plan"]["epochs"] + 1))

    rows = [json.loads(line) for line in (held_out / "metadata.jsonl").read_text().splitlines()]
    files = [str(held_out / row["file_name"]) for row in rows]
    app = Pipeline(tiny=True, allow_local_adapters=True)  # as the app serves an adapter folder
    api = [app.caption(f, adapter=str(out)).text for f in files]
    assert sum(a == row["text"] for a, row in zip(api, rows)) >= 0.9 * len(rows)
    base = [app.caption(f, "image-caption").text for f in files]
    assert sum(a == row["text"] for a, row in zip(base, rows)) <= 0.25 * len(rows), "the adapter it started from"
    # another process builds the same tiny models (seeded) and reads the same adapter
    cli = subprocess.run(
        [sys.executable, "-m", "epalm", "caption", "--tiny", "--adapter", str(out), *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert [line.split("\t")[1] for line in cli.stdout.strip().split("\n")] == api
    # a registry entry that names only the adapter folder takes its settings from it
    registry = out.parent / "tasks.yaml"
    registry.write_text("tasks:\n  my-colours:\n    adapter: {filename: colours-adapter}\n")
    mine = Pipeline(device="cpu", tiny=True, registry=load_registry(registry))
    assert mine.task("my-colours").kind == "caption" and mine.caption(files[2], "my-colours").text == api[2]

    # asked to resume, the finished run says there is nothing left, and changes nothing
    before = (out / "adapter.safetensors").read_bytes()
    assert main(["train", "unused", "--base", "image-caption", "--out", str(out), "--tiny", "--resume"]) == 0
    said = capsys.readouterr().out
    assert f"Nothing to resume: the run in {out} had finished. Best CIDEr" in said and "--overwrite" in said
    assert (out / "adapter.safetensors").read_bytes() == before


def test_an_existing_output_folder_is_refused_unless_overwritten_or_resumed(cli_adapter, tmp_path, capsys):
    out, held_out = cli_adapter
    argv = ["train", str(held_out), "--base", "image-caption", "--tiny", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {out} already holds an adapter: --overwrite replaces it when the new run finishes" in err
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"mine")
    assert main([*argv, "--out", str(tmp_path / "photos"), "--overwrite"]) == 2
    assert "is not empty and holds no adapter: choose another --out" in capsys.readouterr().err
    assert (tmp_path / "photos" / "keep.jpg").read_bytes() == b"mine"
    assert main([*argv, "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "error: nothing to resume:" in capsys.readouterr().err


def test_bad_settings_are_clear_errors(tmp_path, capsys):
    argv = ["train", str(tmp_path), "--base", "image-caption", "--out", str(tmp_path / "out"), "--tiny"]
    assert main([*argv, "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "error: batch_size (--batch-size) must be at least 1, got 0\n"
    assert main([*argv, "--epochs", "-1", "--lr", "-2"]) == 2
    err = capsys.readouterr().err
    assert "epochs (--epochs) must be at least 1, got -1; lr (--lr) must not be negative, got -2.0" in err
    assert main([*argv, "--validation-fraction", "1.5"]) == 2
    assert "validation_fraction (--validation-fraction) must be between 0 and 1" in capsys.readouterr().err


def test_train_pushes_to_the_hub_and_the_adapter_is_used_back_from_there(pipe, fake_hub, tmp_path, monkeypatch, capsys):
    """`train --push-to-hub` through huggingface_hub's real upload path (to the loopback fake Hub)."""
    data = write_colour_folder(tmp_path / "train", per_colour=2)
    argv = ["train", str(data), "--base", "image-caption", "--tiny", "--device", "cpu", "--no-progress"]
    argv += ["--epochs", "1", "--push-to-hub", "someone/colours", "--out"]
    # no token: refused before any training, with nothing sent
    assert main([*argv, str(tmp_path / "no-token")]) == 2
    assert "needs a Hugging Face token with write access: log in with `hf auth login`" in capsys.readouterr().err
    assert not list(tmp_path.glob("no-token*")) and fake_hub.requests == []
    # a token the Hub refuses: the trained adapter is kept, and the error says how to upload it later
    monkeypatch.setenv("HF_TOKEN", "hf_not_this_one")
    assert main([*argv, str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "the Hub answered 401 (Invalid credentials in Authorization header); log in with `hf auth login`" in err
    assert f"The adapter is saved in {tmp_path / 'refused'}; upload it later with `hf upload someone/colours" in err
    assert (tmp_path / "refused" / "adapter.safetensors").is_file() and not fake_hub.commits

    monkeypatch.setenv("HF_TOKEN", FakeHub.TOKEN)
    out = tmp_path / "adapter"
    assert main([*argv, str(out)]) == 0
    assert f"uploaded to {fake_hub.url}/someone/colours\n" in capsys.readouterr().out
    [(repo, summary, files)] = fake_hub.commits
    published = {"adapter.safetensors", "adapter_config.json", "README.md", "log.jsonl"}
    assert repo == "someone/colours" and set(files) == published
    assert all(files[name] == (out / name).read_bytes() for name in files)
    assert "--adapter someone/colours --tiny" in files["README.md"].decode()  # the card's usage names the repo

    image = data / "red_0.png"
    fast = ["--preset", "fast", "--max-new-tokens", "6"]
    assert main(["caption", str(image), "--adapter", "someone/colours", "--tiny", *fast]) == 0
    from_cli = capsys.readouterr().out.strip().split("\t")[1]
    # read at the commit `main` points at now: a re-push is seen, and config and weights are of one version
    assert {f"/someone/colours/resolve/{fake_hub.commit}/adapter.safetensors"} <= set(fake_hub.downloads)
    from_hub, from_folder = (
        pipe.caption(image, adapter=adapter, preset="fast", max_new_tokens=6).text
        for adapter in ("someone/colours", str(out))
    )
    assert from_cli == from_hub == from_folder


def test_pipeline_shares_models_with_user_adapters_and_guards_folders(pipe, tmp_path):
    data = write_colour_folder(tmp_path / "train", per_colour=4)
    train(data, "image-caption", tmp_path / "adapter", pipeline=pipe, epochs=1, progress=False)
    loaded = set(pipe.loaded())
    pipe.caption(data / "red_0.png", adapter=str(tmp_path / "adapter"))
    added = set(pipe.loaded()) - loaded
    assert len(added) == 1 and "adapter" in added.pop()  # the LM and encoder were reused
    public = Pipeline(device="cpu", tiny=True, allow_local_adapters=False)
    with pytest.raises(ValueError, match="not a Hub repo id .*; adapter folders on this machine are not accepted"):
        public.caption(data / "red_0.png", adapter=str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="neither an existing folder nor a Hub repo id"):
        pipe.caption(data / "red_0.png", adapter="not a repo")
    with pytest.raises(ValueError, match="trained on the tiny test models"):
        Pipeline(device="cpu").caption(data / "red_0.png", adapter=str(tmp_path / "adapter"))


# -- interrupting and resuming ----------------------------------------------------------------------


def ctrl_c_at_training_step(monkeypatch, step: int) -> None:
    """Ctrl-C (SIGINT to this process) while the `step`-th training step of this run computes its loss."""
    forward, calls = AdapterLoss.forward, {"n": 0}

    def forward_then_ctrl_c(self, *args):
        calls["n"] += self.training  # training steps, not the validation loss
        if self.training and calls["n"] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *args)

    monkeypatch.setattr(AdapterLoss, "forward", forward_then_ctrl_c)


def ctrl_c_at_validation(monkeypatch, number: int) -> None:
    """Ctrl-C while the `number`-th validation decodes (the first is the one before training)."""
    answers, calls = Trainer._answers, {"n": 0}

    def answers_then_ctrl_c(self, adapter, examples):
        calls["n"] += 1
        if calls["n"] == number:
            os.kill(os.getpid(), signal.SIGINT)
        return answers(self, adapter, examples)

    monkeypatch.setattr(Trainer, "_answers", answers_then_ctrl_c)


def assert_same_run(straight: Path, resumed: Path) -> None:
    """The same adapter, log (timings aside), config and model card, bit for bit."""
    a, b = load_file(straight / "adapter.safetensors"), load_file(resumed / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def log(folder: Path) -> list[dict]:
        records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIMING} for r in records]

    assert log(straight) == log(resumed)
    assert (straight / "adapter_config.json").read_text() == (resumed / "adapter_config.json").read_text()
    cards = [(f / "README.md").read_text().replace(str(f), "OUT") for f in (straight, resumed)]
    assert cards[0] == cards[1]


@pytest.mark.parametrize(
    "options, step, where",
    [
        ({}, 41, "in epoch 21 of 150, after step 1 of 2"),  # the default (small) recipe
        (PAPER, 6, "in epoch 2 of 3, after step 2 of 4"),  # the paper's, with the LM's dropout
    ],
)
def test_an_interrupted_run_resumes_to_the_same_adapter_log_and_card(pipe, tmp_path, monkeypatch, options, step, where):
    data = write_colour_folder(tmp_path / "colours", per_colour=5 if options is not PAPER else 2)
    train(data, "image-caption", tmp_path / "straight", pipeline=pipe, **{"progress": False, **options})
    ctrl_c_at_training_step(monkeypatch, step)
    out = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(data, "image-caption", out, pipeline=pipe, **{"progress": False, **options})
    assert str(stopped.value) == (
        f"Interrupted {where}; the state is saved in {out}.training. Run the same command with --resume to continue."
    )
    assert not out.exists(), "nothing is written to the output folder before the run finishes"
    monkeypatch.undo()
    train(data, "image-caption", out, pipeline=pipe, resume=True, **{"progress": False, **options})
    assert_same_run(tmp_path / "straight", out)
    assert not (tmp_path / "resumed.training").exists()


def test_a_run_interrupted_while_validating_resumes_with_that_epoch_whole(pipe, tmp_path, monkeypatch, caplog):
    data = write_colour_folder(tmp_path / "colours", per_colour=2)
    straight = train(data, "image-caption", tmp_path / "straight", pipeline=pipe, **PAPER)
    ctrl_c_at_validation(monkeypatch, 3)  # before training, epoch 1, then epoch 2's
    out = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted, match="^Interrupted while validating epoch 2 of 3; the state is saved"):
        train(data, "image-caption", out, pipeline=pipe, **PAPER)
    monkeypatch.undo()
    resumed = train(data, "image-caption", out, pipeline=pipe, resume=True, **PAPER)
    assert "resuming with the validation of epoch 2 of 3" in caplog.text
    assert_same_run(tmp_path / "straight", out)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    assert all(h["samples_per_s"] > 0 for h in resumed.history)


def test_an_interrupted_retrain_leaves_the_previous_adapter_as_it_was(pipe, tmp_path, monkeypatch):
    data = write_colour_folder(tmp_path / "colours", per_colour=2)
    out = tmp_path / "adapter"
    train(data, "image-caption", out, pipeline=pipe, **{**PAPER, "epochs": 1})
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    answer = pipe.caption(data / "red_0.png", adapter=str(out)).text
    ctrl_c_at_training_step(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted, match=f"saved in {out}.training \\({out} is as it was\\)"):
        train(data, "image-caption", out, pipeline=pipe, overwrite=True, **PAPER)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert Pipeline(device="cpu", tiny=True).caption(data / "red_0.png", adapter=str(out)).text == answer
    with pytest.raises(ValueError, match="holds an interrupted run: continue it with --resume, or start over"):
        train(data, "image-caption", out, pipeline=pipe, overwrite=False, **PAPER)
    train(data, "image-caption", out, pipeline=pipe, resume=True, **PAPER)
    assert json.loads((out / "adapter_config.json").read_text())["training"]["plan"]["epochs"] == 3
    assert not (tmp_path / "adapter.training").exists() and not (tmp_path / "adapter.replaced").exists()


def test_resuming_with_other_settings_is_refused(pipe, tmp_path, monkeypatch):
    data = write_colour_folder(tmp_path / "colours", per_colour=2)
    ctrl_c_at_training_step(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        train(data, "image-caption", tmp_path / "adapter", pipeline=pipe, **PAPER)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"started with other settings \(epochs\): resume it with the same command"):
        train(data, "image-caption", tmp_path / "adapter", pipeline=pipe, resume=True, **{**PAPER, "epochs": 4})


def test_ctrl_c_while_the_command_starts_says_so_without_a_traceback(tmp_path):
    data = write_colour_folder(tmp_path / "colours", per_colour=1)
    command = [sys.executable, "-m", "epalm", "train", str(data), "--base", "image-caption", "--tiny"]
    process = subprocess.Popen(
        [*command, "--out", str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        process.wait(timeout=1.0)  # still importing torch
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err and "Interrupted" in err, err
    assert not (tmp_path / "out").exists()


# -- what a run is made of --------------------------------------------------------------------------


def test_each_file_is_encoded_once_and_validation_decodes_each_once_against_all_its_captions(
    pipe, tmp_path, monkeypatch, encoder_calls
):
    from epalm import training

    data = write_colour_folder(tmp_path / "train" / "train", per_colour=3)
    validation = write_colour_folder(tmp_path / "train" / "validation", per_colour=1, seed=500)
    rows = [json.loads(line) for line in (validation / "metadata.jsonl").read_text().splitlines()]
    captions = [{**row, "text": f"{row['text']} {word}"} for row in rows for word in ("", "thing", "one")]
    (validation / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in captions))
    decoded, scored = [], []
    answers, scores = training.Trainer._answers, training.caption_scores
    monkeypatch.setattr(
        training.Trainer, "_answers", lambda self, a, e: decoded.extend(x.key for x in e) or answers(self, a, e)
    )
    monkeypatch.setattr(training, "caption_scores", lambda p, r: scored.append((p, r)) or scores(p, r))
    calls = encoder_calls(pipe.encoder(pipe.task("image-caption")))
    result = train(data.parent, "image-caption", tmp_path / "adapter", pipeline=pipe, **{**PAPER, "epochs": 1})
    assert calls == [1] * (12 + 4), "each file once, before the first epoch"
    assert sorted(decoded) == sorted([str(validation / row["file_name"]) for row in rows] * 2), "once a validation"
    assert all(len(p) == 4 and all(len(r) == 3 for r in refs) for p, refs in scored)
    assert result.history[0]["epoch"] == 1


def test_texts_longer_than_the_lms_positions_are_cut_saying_so(pipe, tmp_path, caplog):
    data = write_colour_folder(tmp_path / "colours", per_colour=2)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = " ".join(["a red"] * 150)  # 300 words: more tokens than the tiny LM's 256 positions
    rows[1]["text"] = "a red " * 800_000  # a few megabytes
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = train(data, "image-caption", tmp_path / "adapter", pipeline=pipe, **{**PAPER, "epochs": 1})
    assert "2 texts are longer than the LM's 256 positions and were cut to them (the longest: metadata.jsonl" in (
        caplog.text
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["training"]["data"]["cut_texts"] == 2 and result.best_epoch == 1
    assert "2 texts cut to the LM's positions" in (tmp_path / "adapter" / "README.md").read_text()


def test_training_that_beats_nothing_says_so_plainly(pipe, tmp_path, capsys):
    """With every learning rate at 0 the adapter stays the one it started from: the run says it did not beat it."""
    data = write_colour_folder(tmp_path / "colours", per_colour=2)
    argv = ["train", str(data), "--base", "image-caption", "--tiny", "--no-progress", "--out", str(tmp_path / "a")]
    assert main([*argv, "--epochs", "2", "--lr", "0", "--prompt-lr", "0"]) == 0
    said = capsys.readouterr().out
    assert said.startswith("Training did not beat the adapter it started from: best CIDEr 0.0000 (epoch 1) against ")
    assert "before training (the base task's adapter, on the same validation rows)" in said
    card = (tmp_path / "a" / "README.md").read_text()
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert "## Result\nTraining did not beat the adapter it started from" in card and log[-1]["improved"] is False
    kept = load_file(tmp_path / "a" / "adapter.safetensors")
    base = Pipeline(device="cpu", tiny=True).adapter(pipe.task("image-caption")).state_dict()
    assert all(torch.equal(kept[k], base[k]) for k in base), "started from the base task's adapter"


def test_a_flat_metric_stops_the_run_early_saying_why(pipe, tmp_path, caplog):
    data = write_colour_folder(tmp_path / "colours", per_colour=2)
    result = train(data, "image-caption", tmp_path / "a", pipeline=pipe, epochs=10, lr=0.0, patience=2, progress=False)
    reason = "stopped early after epoch 3 of 10: neither CIDEr nor the validation loss improved for 2 validations"
    assert result.stopped.startswith(reason) and reason in caplog.text and len(result.history) == 3
    assert "Stopped early after epoch 3 of 10" in (tmp_path / "a" / "README.md").read_text()


def test_only_the_adapter_learns_and_checkpointing_keeps_gradients(pipe):
    task = pipe.task("image-caption")
    lm, _ = pipe.lm(task)
    from epalm.model import Adapter

    torch.manual_seed(0)
    model = AdapterLoss(Adapter(task.injection, 32, 32, 32))
    features, ids = torch.randn(3, 2, 32), torch.tensor([[2, 40, 50, 2], [2, 60, 2, 1]])
    mask = (ids != 1).long()
    grads = []
    for checkpointing in (False, True):
        lm.checkpointing = checkpointing
        model.zero_grad()
        model(features, ids, mask, ids.masked_fill(mask == 0, -100), lm).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    lm.checkpointing = False
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))
    assert all(p.grad is None and not p.requires_grad for p in lm.parameters())


def test_cli_refuses_bad_rows_and_a_task_of_the_wrong_kind(tmp_path, capsys):
    data = write_colour_folder(tmp_path / "train", per_colour=2)
    with (data / "metadata.jsonl").open("a") as out:
        out.write(json.dumps({"file_name": "missing.png", "text": "a red"}) + "\n")
    argv = ["train", str(data), "--out", str(tmp_path / "out"), "--tiny", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--base", "image-caption", "--refuse-bad"]) == 2
    err = capsys.readouterr().err
    assert "1 bad row (without --refuse-bad they are skipped):\n  metadata.jsonl row 9: file not found" in err
    assert main([*argv, "--base", "image-vqa"]) == 2
    assert "the data has no 'question' or 'answer' column for a qa task (name yours with" in capsys.readouterr().err
    (data / "metadata.jsonl").write_text("\n".join((data / "metadata.jsonl").read_text().splitlines()[:-1]) + "\n")
    (data / "blue_1.png").write_bytes(b"\x89PNG but not really")  # found when the files are decoded, in the run
    assert main([*argv, "--base", "image-caption", "--refuse-bad"]) == 2
    assert "1 bad row (without --refuse-bad they are skipped):\n  metadata.jsonl row 6: unreadable" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.training").exists()


def test_cached_features_train_the_same_adapter(pipe, tmp_path):
    """The frozen encoder's features, computed once or at every step, give the same adapter."""
    data = write_colour_folder(tmp_path / "train", per_colour=2)
    for name, cache in (("cached", True), ("computed", False)):
        train(data, "image-caption", tmp_path / name, pipeline=pipe, cache_features=cache, **{**PAPER, "epochs": 1})
    cached, computed = (load_file(tmp_path / name / "adapter.safetensors") for name in ("cached", "computed"))
    assert cached.keys() == computed.keys() and all(torch.allclose(cached[k], computed[k], atol=1e-6) for k in cached)


def test_the_module_cites_the_projects_own_reference():
    source = (ROOT / "epalm" / "training.py").read_text()
    assert "epalm-facts" not in source and "docs/original.md" in source and "random frame per segment" in source
    assert "## Training" in (ROOT / "docs" / "original.md").read_text()

"""Training: tiny models learn synthetic tasks the tests build, by the paper's recipe, and the
adapter they write is used by the Python API, the CLI and a registry entry alike."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from epalm.__main__ import main
from epalm.pipeline import Pipeline
from epalm.tasks import load_registry
from epalm.training import AdapterLoss, TrainConfig, parameter_groups, scheduled_lr, train

from conftest import COLOURS, ROOT, FakeHub, write_colour_folder

# small data, a high learning rate and no dropout: the tiny task is learnt in a few dozen steps
FAST = dict(
    batch_size=4,
    lr=2e-2,
    warmup_lr=2e-2,
    prompt_lr=2e-2,
    eval_beams=1,
    eval_max_new_tokens=4,
    dropout=False,
    progress=False,
    device="cpu",
)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(device="cpu", tiny=True, pack_weights=False)


def exact_match(pipe: Pipeline, folder, adapter=None, task=None, question=None, every: int = 1) -> float:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()][::every]
    hits = 0
    for row in rows:
        path = folder / row["file_name"]
        # greedy: beam search's length normalisation favours the long, confident ramblings of a random
        # tiny LM over a short answer, which real OPT does not produce
        options = dict(adapter=adapter, preset="fast", max_new_tokens=5)
        answer = pipe.answer(path, question, task, **options) if question else pipe.caption(path, task, **options)
        hits += answer.text == row.get("text", row.get("answer"))
    return hits / len(rows)


@pytest.mark.parametrize(
    "base, suffix, per_colour",
    [
        ("image-caption", ".png", 12),
        ("audio-caption", ".wav", 12),
        ("video-caption", ".mp4", 8),
    ],  # video decodes slowly
)
def test_tiny_models_learn_to_caption_colours_and_pitches(pipe, tmp_path, base, suffix, per_colour):
    data = write_colour_folder(tmp_path / "train", per_colour=per_colour, suffix=suffix)
    held_out = write_colour_folder(tmp_path / "held_out", per_colour=3, suffix=suffix, seed=1000)
    result = train(data, base, tmp_path / "adapter", pipeline=pipe, epochs=8, **FAST)
    assert result.metric == "CIDEr" and result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert exact_match(pipe, held_out, adapter=str(tmp_path / "adapter")) >= 0.9
    assert exact_match(pipe, held_out, task=base, every=3) <= 0.25  # the untrained (random) adapter: chance at best


def test_tiny_models_learn_a_qa_task(pipe, tmp_path):
    data = write_colour_folder(tmp_path / "train", per_colour=12, qa=True)
    held_out = write_colour_folder(tmp_path / "held_out", per_colour=3, qa=True, seed=1000)
    # the original's loss also covers the question, which a random tiny LM takes long to learn to say
    result = train(data, "image-vqa", tmp_path / "adapter", pipeline=pipe, epochs=8, answer_loss_only=True, **FAST)
    assert result.metric == "VQA accuracy"
    assert exact_match(pipe, held_out, adapter=str(tmp_path / "adapter"), question="what colour is it") >= 0.9
    assert exact_match(pipe, held_out, task="image-vqa", question="what colour is it", every=3) <= 0.25


def test_adapter_round_trip_python_cli_and_registry(pipe, tmp_path):
    data = write_colour_folder(tmp_path / "train", per_colour=10)
    out = tmp_path / "colours-adapter"
    train(data, "image-caption", out, pipeline=pipe, epochs=5, **FAST)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_task"] == "image-caption" and config["tiny"] and config["training"]["data"]["train"] > 0
    assert config["label"] == f"{pipe.task('image-caption').label}, trained on {data.name}", "its own menu label"
    card = (out / "README.md").read_text()
    assert "CIDEr" in card and "epochs" in card and "training" in card.lower()
    head = card.split("## Data")[0]  # the converted adapters' card head: front matter, models, injection
    assert head.startswith("---\nlibrary_name: epalm-demo\n") and "\n- Encoder (frozen): `" in head
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5] and all("CIDEr" in r and "BLEU-4" in r for r in epochs)
    assert [r["step"] for r in log if r["event"] == "step"][:2] == [10, 20]

    files = [str(data / f"{colour}_0.png") for colour in COLOURS]
    in_process = [Pipeline(device="cpu", tiny=True).caption(f, adapter=str(out), preset="fast").text for f in files]
    assert in_process == [f"a {colour}" for colour in COLOURS]
    # another process builds the same tiny models (seeded) and reads the same adapter
    cli = subprocess.run(
        [sys.executable, "-m", "epalm", "caption", "--tiny", "--preset", "fast", "--adapter", str(out), *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert [line.split("\t")[1] for line in cli.stdout.strip().split("\n")] == in_process
    # a registry entry that names only the adapter folder takes its settings from it
    registry = tmp_path / "tasks.yaml"
    registry.write_text("tasks:\n  my-colours:\n    adapter: {filename: colours-adapter}\n")
    mine = Pipeline(device="cpu", tiny=True, registry=load_registry(registry))
    assert (
        mine.task("my-colours").kind == "caption"
        and mine.caption(files[2], "my-colours", preset="fast").text == in_process[2]
    )


def test_train_pushes_to_the_hub_and_the_adapter_is_used_back_from_there(pipe, fake_hub, tmp_path, monkeypatch, capsys):
    """`train --push-to-hub` through huggingface_hub's real upload path (to the loopback fake Hub)."""
    data = write_colour_folder(tmp_path / "train", per_colour=2)
    argv = ["train", str(data), "--base", "image-caption", "--tiny", "--device", "cpu", "--no-progress"]
    argv += ["--epochs", "1", "--lr", "2e-2", "--eval-beams", "1", "--push-to-hub", "someone/colours", "--out"]
    # no token: refused before any training, with nothing sent
    assert main([*argv, str(tmp_path / "no-token")]) == 2
    assert "needs a Hugging Face token with write access: log in with `hf auth login`" in capsys.readouterr().err
    assert not (tmp_path / "no-token").exists() and fake_hub.requests == []
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
    assert repo == "someone/colours" and set(files) == published  # not the resume state in last/
    assert (out / "last").is_dir() and all(files[name] == (out / name).read_bytes() for name in files)
    assert "--adapter someone/colours --tiny" in files["README.md"].decode()  # the card's usage names the repo

    image = data / "red_0.png"
    fast = ["--preset", "fast", "--max-new-tokens", "6"]
    assert main(["caption", str(image), "--adapter", "someone/colours", "--tiny", *fast]) == 0
    from_cli = capsys.readouterr().out.strip().split("\t")[1]
    assert {"/someone/colours/resolve/main/adapter.safetensors"} <= set(fake_hub.downloads)
    from_hub, from_folder, base = (
        pipe.caption(image, task, adapter=adapter, preset="fast", max_new_tokens=6).text
        for task, adapter in ((None, "someone/colours"), (None, str(out)), ("image-caption", None))
    )
    assert from_cli == from_hub == from_folder != base


def test_pipeline_shares_models_with_user_adapters_and_guards_folders(pipe, tmp_path):
    data = write_colour_folder(tmp_path / "train", per_colour=4)
    train(data, "image-caption", tmp_path / "adapter", pipeline=pipe, epochs=1, **FAST)
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


def test_interrupted_training_resumes_to_the_same_adapter(pipe, tmp_path, monkeypatch):
    data = write_colour_folder(tmp_path / "train", per_colour=6)
    options = dict(pipeline=pipe, epochs=2, **FAST)
    train(data, "image-caption", tmp_path / "straight", **options)

    calls = {"n": 0}
    forward = AdapterLoss.forward

    def interrupt_at_step_8(self, *args):
        calls["n"] += self.training  # training steps, not the validation loss
        if calls["n"] == 8 and self.training:  # in the second epoch (6 batches per epoch), one batch done
            raise KeyboardInterrupt
        return forward(self, *args)

    monkeypatch.setattr(AdapterLoss, "forward", interrupt_at_step_8)
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        train(data, "image-caption", tmp_path / "resumed", **options)
    progress = json.loads((tmp_path / "resumed" / "last" / "progress.json").read_text())
    assert (progress["epoch"], progress["step"]) == (1, 1)
    monkeypatch.setattr(AdapterLoss, "forward", forward)
    train(data, "image-caption", tmp_path / "resumed", resume=True, **options)
    from safetensors.torch import load_file

    straight, resumed = (
        load_file(tmp_path / "straight" / "adapter.safetensors"),
        load_file(tmp_path / "resumed" / "adapter.safetensors"),
    )
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)


def test_validation_decodes_each_file_once_and_scores_it_against_all_its_captions(pipe, tmp_path, monkeypatch):
    from epalm import training

    data = write_colour_folder(tmp_path / "train", per_colour=4)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    validation = data / "validation"
    write_colour_folder(validation, per_colour=1)
    val_rows = [json.loads(line) for line in (validation / "metadata.jsonl").read_text().splitlines()]
    captions = [{**row, "text": f"{row['text']} {word}"} for row in val_rows for word in ("", "thing", "one")]
    (validation / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in captions))
    (data / "train").mkdir()
    for row in rows:
        (data / row["file_name"]).rename(data / "train" / row["file_name"])
    (data / "metadata.jsonl").rename(data / "train" / "metadata.jsonl")
    decoded, scored = [], []
    predict, scores = training.Trainer.predict, training.caption_scores
    monkeypatch.setattr(training.Trainer, "predict", lambda self, a, e: decoded.append(e.path) or predict(self, a, e))
    monkeypatch.setattr(training, "caption_scores", lambda p, r: scored.append((p, r)) or scores(p, r))
    train(data, "image-caption", tmp_path / "adapter", pipeline=pipe, epochs=1, **FAST)
    assert sorted(decoded) == sorted(validation / row["file_name"] for row in val_rows), "one decode per file"
    ((predictions, references),) = scored
    assert len(predictions) == len(val_rows) and all(len(r) == 3 for r in references)


def test_recipe_schedule_and_parameter_groups(pipe):
    config = TrainConfig(epochs=8, lr=2e-5, warmup_lr=1e-5, min_lr=1e-6)
    assert [scheduled_lr(config, 0, i) for i in (0, 99, 100, 250, 399, 400, 5000)] == pytest.approx(
        [1e-5, 1e-5, 1.25e-5, 1.5e-5, 1.75e-5, 2e-5, 2e-5]
    )
    assert scheduled_lr(config, 4, 0) == pytest.approx(1e-6 + 0.5 * (2e-5 - 1e-6) * (1 + math.cos(math.pi * 4 / 8)))
    caption, qa = pipe.task("image-caption"), pipe.task("image-vqa")
    from epalm.model import Adapter

    adapter = Adapter(caption.injection, 32, 32, 32)  # only the adapter's shape matters here
    groups = parameter_groups(adapter, caption, config.resolved(caption))
    assert groups[0]["weight_decay"] == 0 and all(p.ndim == 1 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.02 and groups[1]["lr"] == 2e-5
    qa_groups = parameter_groups(adapter, qa, TrainConfig().resolved(qa))
    names = {id(p): n for n, p in adapter.named_parameters()}
    assert all("connector" in names[id(p)] for p in qa_groups[0]["params"]) and qa_groups[1]["lr"] == 1e-5
    assert all("prompt" in names[id(p)] for p in qa_groups[1]["params"])
    assert TrainConfig().resolved(qa).batch_size == 64 and TrainConfig().resolved(caption).epochs == 8


@pytest.mark.parametrize("all_groups", [False, True])
def test_the_schedule_moves_group_0_only_unless_told_to_move_all(pipe, tmp_path, all_groups):
    data = write_colour_folder(tmp_path / "train", per_colour=2, qa=True)
    rates = dict(lr=4e-3, warmup_lr=1e-3, prompt_lr=2e-2, min_lr=1e-4, warmup_steps=2, warmup_every=1)
    options = {**FAST, **rates, "log_every": 1, "schedule_all_groups": all_groups}
    train(data, "image-vqa", tmp_path / "adapter", pipeline=pipe, epochs=2, **options)
    lines = [json.loads(line) for line in (tmp_path / "adapter" / "log.jsonl").read_text().splitlines()]
    group_lrs = [line["group_lrs"] for line in lines if line["event"] == "step"]
    scheduled = [lrs[0] for lrs in group_lrs]
    assert scheduled[0] == pytest.approx(1e-3) and scheduled[-1] < 4e-3, "group 0: warm-up, then cosine"
    prompt = [lrs[1] for lrs in group_lrs]
    assert prompt == pytest.approx(scheduled if all_groups else [2e-2] * len(prompt))


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
    assert "metadata.jsonl:9: file not found: missing.png" in capsys.readouterr().err
    assert main([*argv, "--base", "image-vqa"]) == 2
    assert "the data has text columns, but the base task 'image-vqa' is a qa task" in capsys.readouterr().err


def test_cached_features_train_the_same_adapter_and_the_base_adapter_can_start_it(pipe, tmp_path):
    """The frozen encoder's features, computed once or at every step, give the same adapter; with every
    learning rate at 0, --init-from-base leaves the released (here: the tiny registry's) adapter as it was."""
    from safetensors.torch import load_file

    data = write_colour_folder(tmp_path / "train", per_colour=2)
    for name, cache in (("cached", True), ("computed", False)):
        train(data, "image-caption", tmp_path / name, pipeline=pipe, epochs=1, cache_features=cache, **FAST)
    cached, computed = (load_file(tmp_path / name / "adapter.safetensors") for name in ("cached", "computed"))
    assert cached.keys() == computed.keys() and all(torch.allclose(cached[k], computed[k], atol=1e-6) for k in cached)
    still = {**FAST, "lr": 0.0, "warmup_lr": 0.0, "prompt_lr": 0.0}
    train(data, "image-caption", tmp_path / "base", pipeline=pipe, epochs=1, init_from_base=True, **still)
    kept = load_file(tmp_path / "base" / "adapter.safetensors")
    base = pipe.adapter(pipe.task("image-caption")).state_dict()
    assert kept.keys() == base.keys() and all(torch.equal(kept[k], base[k]) for k in base)
    assert not all(torch.equal(cached[k], base[k]) for k in base), "trained from scratch, it differs"

"""The real (non-tiny) path end to end, against a loopback Hub that serves the real repo ids and
file layouts at reduced sizes: the Pipeline and the CLI fetch each file they need once, load every
weight, and run again offline without a single request."""

from __future__ import annotations

import collections
import io
import logging
import sys
import threading

import pytest
import torch
from safetensors.torch import load as load_safetensors

from epalm.__main__ import main
from epalm.errors import WeightsUnavailable
from epalm.pipeline import Pipeline
from epalm.tasks import load_registry

from conftest import AST, TIMESFORMER, ast_4x_name

JOBS = [("image-caption", "image", None), ("video-qa-msrvtt", "video", "what is it"), ("audio-caption", "audio", None)]
SETTINGS = dict(preset="fast", max_new_tokens=4)
OPT, VIT = "facebook/opt-2.7b", "timm/vit_base_patch16_224.augreg_in21k_ft_in1k"
NEEDED = (
    {  # what these three tasks need, and nothing else the repos hold
        f"/{OPT}/resolve/main/{name}"
        for name in ("config.json", "tokenizer_config.json", "vocab.json", "merges.txt", "pytorch_model.bin")
    }
    | {
        f"/{VIT}/resolve/main/model.safetensors",
        f"/{TIMESFORMER}/resolve/main/config.json",
        f"/{TIMESFORMER}/resolve/main/pytorch_model.bin",
        f"/{AST}/resolve/main/config.json",
        f"/{AST}/resolve/main/model.safetensors",
    }
    | {
        f"/spaces/mshukor/eP-ALM/resolve/main/checkpoints/float32/ePALM_{name}/checkpoint_best.pth"
        for name in ("caption", "video_qa_msrvtt", "audio_caption")
    }
)


def answers(pipe: Pipeline, media_files) -> list[str]:
    return [
        (
            pipe.answer(media_files[kind], question, task, **SETTINGS)
            if question
            else pipe.caption(media_files[kind], task, **SETTINGS)
        ).text
        for task, kind, question in JOBS
    ]


def go_offline(hub, monkeypatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()


def test_pipeline_fetches_each_needed_file_once_loads_every_weight_and_reruns_offline(
    real_hub, real_repos, media_files, monkeypatch, capfd
):
    registry = load_registry(real_hub.registry)
    messages: list[str] = []
    pipe = Pipeline(device="cpu", registry=registry, progress=messages.append, pack_weights=False)
    reports: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = reports.append
    logging.getLogger("transformers").addHandler(handler)  # its own logger, which does not propagate
    try:
        first = answers(pipe, media_files)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in reports if "LOAD REPORT" in r.getMessage()], "every key of every checkpoint is used"
    assert all(isinstance(text, str) for text in first)
    assert collections.Counter(real_hub.downloads) == dict.fromkeys(NEEDED, 1), "each needed file once, nothing else"
    assert [m for m in messages if m.startswith(f"Downloading pytorch_model.bin in {OPT}: 307 KiB of 307 KiB (100%), ")]
    assert f"Reading the weights of {OPT} (307 KiB)" in messages and "Loading OPT-2.7B language model…" in messages
    assert all(messages.count(m) == 1 for m in messages if m.startswith(("Loading", "Loaded", "Reading"))), "once each"
    assert not [t for t in threading.enumerate() if "conversion" in t.name], "no background safetensors conversion"
    api = [r for r in real_hub.requests if "/resolve/main/" not in r and r != "GET /api/agent-harnesses"]
    assert api == [], "file requests only (huggingface_hub itself fetches its agent list once a day)"

    # every weight is the checkpoint's: the float16 OPT read into float32, the encoders' classifier checkpoints
    lm = pipe.lm(pipe.task("image-caption"))[0].lm
    saved = torch.load(io.BytesIO(real_repos[("model", OPT, "pytorch_model.bin")]), weights_only=True)
    assert lm.dtype == torch.float32 and len(saved) == len(lm.model.state_dict())
    assert all(torch.equal(lm.model.state_dict()[key], value.float()) for key, value in saved.items())
    assert torch.equal(lm.lm_head.weight, lm.model.decoder.embed_tokens.weight)
    vit = pipe.encoder(pipe.task("image-caption")).model
    saved = load_safetensors(real_repos[("model", VIT, "model.safetensors")])
    assert all(torch.equal(vit.state_dict()[key], value) for key, value in saved.items() if not key.startswith("head."))
    video = pipe.encoder(pipe.task("video-qa-msrvtt")).model.state_dict()
    saved = torch.load(io.BytesIO(real_repos[("model", TIMESFORMER, "pytorch_model.bin")]), weights_only=True)
    body = {k.removeprefix("timesformer."): v for k, v in saved.items() if k.startswith("timesformer.")}
    assert body.keys() == video.keys() and all(torch.equal(video[k], v) for k, v in body.items())
    audio = pipe.encoder(pipe.task("audio-caption")).model.state_dict()  # transformers 5 names, from the 4.x ones
    saved = load_safetensors(real_repos[("model", AST, "model.safetensors")])
    assert all(torch.equal(v, saved["audio_spectrogram_transformer." + ast_4x_name(k)]) for k, v in audio.items())
    assert len(audio) == len([k for k in saved if not k.startswith("classifier.")])

    assert main(["tasks", "--registry", str(real_hub.registry)]) == 0
    rows = {line.split()[0]: line.split()[-1] for line in capfd.readouterr().out.strip().split("\n")[1:]}
    assert rows["image-caption"] == rows["video-qa-msrvtt"] == rows["audio-caption"] == "yes/yes/yes"
    assert rows["image-vqa"] == rows["video-caption"] == "no/yes/yes" and rows["image-caption-L"] == "no/no/no"

    go_offline(real_hub, monkeypatch)
    again = Pipeline(device="cpu", registry=registry, pack_weights=False)
    assert answers(again, media_files) == first
    assert real_hub.requests == [], "offline, everything comes from the cache"


def test_cli_download_fetches_exactly_the_tasks_files_then_captions_offline(
    real_hub, media_files, monkeypatch, capfd, caplog
):
    registry = str(real_hub.registry)
    real_hub.too_many[f"/{OPT}/resolve/main/pytorch_model.bin"] = 1  # rate limited once: huggingface_hub retries
    # huggingface_hub prints its warnings with its own handler, made at its import: point it at this test's stderr
    [printer] = logging.getLogger("huggingface_hub").handlers
    monkeypatch.setattr(printer, "stream", sys.stderr)
    assert main(["download", "image-caption", "--registry", registry]) == 0
    out, err = capfd.readouterr()
    needed = {path for path in NEEDED if OPT in path or VIT in path or "ePALM_caption" in path}
    assert collections.Counter(real_hub.downloads) == dict.fromkeys(needed, 1)
    commit = real_hub.COMMIT
    assert f"{OPT}@{commit}: config.json, tokenizer_config.json, vocab.json, merges.txt, pytorch_model.bin (" in out
    assert err.count("Retrying in") == 1, "huggingface_hub's retry line is printed once"
    assert not [r for r in caplog.records if "Retrying in" in r.getMessage()], "and not again through our logging"

    # the Space's main branch moves: a new adapter file; `download` asks for the branch's commit and fetches it
    adapter = f"/spaces/mshukor/eP-ALM/resolve/main/{load_registry(registry)['image-caption'].adapter.filename}"
    real_hub.files[adapter] = real_hub.files[adapter] + b"\0"  # a new file of the same archive (zip ignores the tail)
    real_hub.commit = "fedcba9876543210fedcba9876543210fedcba98"
    real_hub.downloads.clear()
    assert main(["download", "image-caption", "--registry", registry]) == 0
    out = capfd.readouterr().out
    assert real_hub.downloads == [adapter], "the changed file only"
    assert f"mshukor/eP-ALM@{real_hub.commit}: " in out and "changed since the last download: checkpoints/" in out
    assert f"{OPT}@{real_hub.commit}: " in out and out.count("changed since") == 1

    go_offline(real_hub, monkeypatch)
    args = ["--task", "image-caption", "--registry", registry, "--preset", "fast", "--max-new-tokens", "4"]
    with caplog.at_level(logging.INFO):
        assert main(["-v", "caption", *args, str(media_files["image"])]) == 0
    out = capfd.readouterr().out
    assert out.startswith(f"{media_files['image']}\t") and out.count("\n") == 1, "nothing else on stdout"
    assert real_hub.requests == []
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("epalm")]
    stages = [m for m in logged if m.startswith(("Loading", "Loaded", "Reading the weights", "Building"))]
    assert len(stages) == len(set(stages)) == 8, f"-v logs each load stage once: {stages}"


def test_an_unreachable_hub_fails_in_one_attempt_with_the_fix(real_hub, media_files, caplog):
    real_hub.server.shutdown()
    real_hub.server.server_close()  # connection refused from now on
    pipe = Pipeline(device="cpu", registry=load_registry(real_hub.registry))
    with caplog.at_level(logging.WARNING, logger="huggingface_hub"), pytest.raises(WeightsUnavailable) as error:
        pipe.caption(media_files["image"], "image-caption")
    message, detail = str(error.value), error.value.detail
    assert message == (  # the first file the task needs, checked before any loads
        "Cannot get the adapter of image-caption: checkpoints/float32/ePALM_caption/checkpoint_best.pth in the Space "
        "mshukor/eP-ALM is not downloaded, and cannot be downloaded now."
    )
    assert f"the Hub ({real_hub.url}) cannot be reached" in detail and real_hub.url not in message
    assert "`python -m epalm download image-caption` fetches" in detail
    assert not [r for r in caplog.records if "Retry" in r.getMessage()], "no retries: fails at once"

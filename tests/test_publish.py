"""Uploading an adapter folder: only its own files, or a clear reason why not."""

from __future__ import annotations

import pytest

from epalm.__main__ import main
from epalm.adapter_format import ADAPTER_FILES
from epalm.errors import UserError, WeightsUnavailable
from epalm.publish import push_to_hub

from conftest import PARITY_CASES, ROOT, FakeHub


def test_push_uploads_only_the_adapter_files_or_says_why_it_cannot(fake_hub, tmp_path, monkeypatch):
    import shutil
    import socket

    import huggingface_hub.constants as constants

    out = tmp_path / "converted"
    out.mkdir()
    case = next(case for case in PARITY_CASES if case.name == "audio_caption")  # the registry's injection
    shutil.copy(case / "adapters.pth", out)  # converted next to the original, which stays local
    registry = tmp_path / "tasks.yaml"  # the fixture's own tiny LM, which convert checks the file against
    text = (ROOT / "checkpoints" / "tasks.yaml").read_text()
    registry.write_text(text.replace("id: facebook/opt-2.7b", "id: test/opt"))
    monkeypatch.setenv("HF_TOKEN", FakeHub.TOKEN)
    argv = ["convert", str(out / "adapters.pth"), str(out), "--task", "audio-caption", "--registry", str(registry)]
    argv += ["--push-to-hub", "someone/conv"]
    assert main(argv) == 0
    [(repo, _, files)] = fake_hub.commits
    assert repo == "someone/conv" and sorted(files) == sorted(ADAPTER_FILES) and (out / "adapters.pth").is_file()
    with pytest.raises(UserError, match=r"Cannot upload to 'conv': give a Hub repo id \(user/name\)"):
        push_to_hub(out, "conv")
    with socket.socket() as closed:  # bound, not listening: the connection is refused
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        with pytest.raises(
            WeightsUnavailable, match=r"Cannot upload to someone/conv: the Hub \(http://127.0.0.1:\d+\) cannot"
        ):
            push_to_hub(out, "someone/conv")

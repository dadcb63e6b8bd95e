"""Files through huggingface_hub: download once, then the cache, then offline; clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from epalm.errors import WeightsUnavailable
from epalm.hub import fetch, is_cached
from epalm.tasks import AdapterSource

from conftest import PARITY_CASES, ROOT


def test_download_then_cache_then_offline(fake_hub, monkeypatch):
    import huggingface_hub.constants as constants

    data = (PARITY_CASES[0] / "adapters.pth").read_bytes()
    fake_hub.add("someone/epalm", "checkpoints/a/checkpoint_best.pth", data, repo_type="space")
    source = AdapterSource("checkpoints/a/checkpoint_best.pth", "someone/epalm", repo_type="space")
    assert not is_cached(source)
    messages = []
    first = fetch(source, progress=messages.append)
    assert first.read_bytes() == data and len(fake_hub.downloads) == 1 and is_cached(source)
    label = "Downloading checkpoints/a/checkpoint_best.pth in the Space someone/epalm"
    assert messages[-1] == f"{label}: 90 KB of 90 KB (100%)"
    assert fetch(source) == first and len(fake_hub.downloads) == 1, "second call is served from the cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.server.shutdown()
    assert fetch(source) == first, "offline mode works from the cache"
    missing = r"b/checkpoint_best.pth in the Space someone/epalm is not in the local Hugging Face cache .*OFFLINE=1"
    with pytest.raises(WeightsUnavailable, match=missing):
        fetch(AdapterSource("checkpoints/b/checkpoint_best.pth", "someone/epalm", repo_type="space"))


def test_offline_environment_variable_is_honoured_in_a_fresh_process(fake_hub, tmp_path):
    fake_hub.add("someone/epalm", "x.pth", b"not used")
    code = (
        "from epalm.hub import fetch, WeightsUnavailable\nfrom epalm.tasks import AdapterSource\n"
        "try:\n    fetch(AdapterSource('x.pth', 'someone/epalm'))\n"
        "except WeightsUnavailable as e:\n    print('REFUSED', e)\n"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "REFUSED" in out.stdout and "someone/epalm" in out.stdout, out.stderr
    assert fake_hub.downloads == [], "no request was made while offline"


def test_missing_file_names_the_repo_and_file(fake_hub):
    with pytest.raises(WeightsUnavailable, match=r"Cannot get the adapter: there is no nope.pth in someone/epalm"):
        fetch(AdapterSource("nope.pth", "someone/epalm"))

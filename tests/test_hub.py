"""Files through huggingface_hub: download once, then the cache, then offline; clear errors."""

from __future__ import annotations

import re
import subprocess
import sys

import huggingface_hub.constants
import pytest

from epalm.errors import Transfer, WeightsUnavailable
from epalm.hub import WEIGHT_FILES, RepoFiles, check, fetch, is_cached, locate
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
    assert messages[-1].startswith(f"{label}: 90 KiB of 90 KiB (100%), ") and messages[-1].endswith("iB/s")
    assert messages[-1].done == messages[-1].total == len(data) == 92_551, "binary units, named as such"
    assert fetch(source) == first and len(fake_hub.downloads) == 1, "second call is served from the cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.server.shutdown()
    assert fetch(source) == first, "offline mode works from the cache"
    missing = r"b/checkpoint_best.pth in the Space someone/epalm is not downloaded, and cannot be downloaded now\.$"
    with pytest.raises(WeightsUnavailable, match=missing) as error:
        fetch(AdapterSource("checkpoints/b/checkpoint_best.pth", "someone/epalm", repo_type="space"))
    cache = constants.HF_HUB_CACHE
    assert (
        error.value.detail
        == f"It is not in the local Hugging Face cache ({cache}) and downloads are off (HF_HUB_OFFLINE=1)."
    )
    assert cache not in str(error.value), "where this machine keeps files is for its owner, not in the message"


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


def test_a_slow_download_reports_its_rate_and_the_time_left(fake_hub):
    fake_hub.add("someone/models", "weights.bin", bytes(400_000))
    fake_hub.bytes_per_s = 100_000  # 4 s
    heard: list[Transfer] = []
    fetch(AdapterSource("weights.bin", "someone/models"), progress=heard.append)
    assert len(heard) >= 5 and [m.done for m in heard] == sorted(m.done for m in heard) and heard[-1].done == 400_000
    middle = heard[len(heard) // 3]
    assert 25_000 < middle.rate < 500_000 and 1 <= middle.left_s < 10
    assert re.fullmatch(
        r"Downloading weights\.bin in someone/models: \d+ KiB of 391 KiB \(\d+%\), \d+ KiB/s, "
        r"about \d\.\d seconds left",
        middle,
    ), middle


def test_locate_with_refresh_fetches_what_changed_after_the_branch_moved(fake_hub):
    files = RepoFiles("the model someone/model", "someone/model", files=("config.json", "weights.bin"))
    fake_hub.add("someone/model", "config.json", b'{"a": 1}')
    fake_hub.add("someone/model", "weights.bin", b"old weights")
    assert locate(files)["weights.bin"].read_bytes() == b"old weights"
    fake_hub.add("someone/model", "weights.bin", b"new weights")
    fake_hub.commit = "89abcdef0123456789abcdef0123456789abcdef"  # main moved
    fake_hub.downloads.clear()
    fake_hub.requests.clear()
    assert locate(files)["weights.bin"].read_bytes() == b"old weights", "a load does not ask the Hub again"
    assert fake_hub.requests == []
    refreshed = locate(files, refresh=True)
    assert (
        refreshed["weights.bin"].read_bytes() == b"new weights" and refreshed["config.json"].read_text() == '{"a": 1}'
    )
    assert fake_hub.downloads == ["/someone/model/resolve/main/weights.bin"], "only the changed file"
    assert locate(files, local_only=True) == refreshed, "and the cache now follows the new commit"


def test_a_host_that_is_not_a_hub_is_named_for_the_owner(fake_hub):
    fake_hub.not_a_hub = True
    with pytest.raises(WeightsUnavailable) as error:
        fetch(AdapterSource("adapter.pth", "someone/epalm"))
    assert str(error.value) == (
        "Cannot get the adapter: the model host does not answer as the Hugging Face Hub does (HTTP 404 for adapter.pth "
        "in someone/epalm)."
    )
    assert error.value.detail.startswith(f"{fake_hub.url} answered HTTP 404 for {fake_hub.url}/someone/epalm/resolve/")
    assert f"is HF_ENDPOINT ({fake_hub.url}) a Hugging Face Hub" in error.value.detail
    assert fake_hub.url not in str(error.value)


def test_check_asks_the_hub_about_each_file_and_downloads_none(fake_hub, monkeypatch):
    import huggingface_hub.constants as constants

    files = RepoFiles("the model someone/model", "someone/model", files=("config.json",), weights=WEIGHT_FILES)
    fake_hub.add("someone/model", "config.json", b"{}")
    fake_hub.add("someone/model", "pytorch_model.bin", bytes(1000))
    assert check(files) == 1002 and fake_hub.downloads == []
    missing = RepoFiles("the model someone/model", "someone/model", files=("config.json", "tokenizer.json"))
    with pytest.raises(WeightsUnavailable, match="there is no tokenizer.json in someone/model"):
        check(missing)
    locate(files)
    assert check(files) == 0
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.requests.clear()
    assert check(files) == 0 and fake_hub.requests == [], "offline, the cache answers"
    with pytest.raises(WeightsUnavailable, match="tokenizer.json in someone/model is not downloaded") as error:
        check(missing)
    assert error.value.not_cached


def test_a_bad_hub_file_is_named_by_its_repo_not_by_where_the_cache_keeps_it(fake_hub):
    from epalm.adapter_format import read_adapter
    from epalm.errors import AdapterError
    from epalm.hub import fetch_and_read

    fake_hub.add("someone/epalm", "checkpoint_best.pth", b"not a checkpoint")
    with pytest.raises(AdapterError) as error:
        fetch_and_read(AdapterSource("checkpoint_best.pth", "someone/epalm"), read_adapter)
    assert str(error.value).startswith("checkpoint_best.pth in someone/epalm is not a readable PyTorch checkpoint")
    cache = huggingface_hub.constants.HF_HUB_CACHE
    assert cache not in str(error.value) and error.value.detail.startswith(cache)

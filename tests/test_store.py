"""Model sources and the model store: device/dtype choice, one load per model, one copy shared."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from epalm.errors import InputError, WeightsUnavailable
from epalm.store import ModelStore, resolve_device, resolve_dtype
from epalm.tasks import load_registry
from epalm.tiny import TinyModels
from epalm.weight_files import dtype_name


class SlowTinyModels(TinyModels):
    """Tiny models that take a while to load and count how often each is built."""

    def __init__(self) -> None:
        super().__init__()
        self.built: list[str] = []

    def lm(self, ref, dtype, progress=None):
        self.built.append(f"lm {ref.id}")
        time.sleep(0.2)  # long enough for every thread to ask while the first load is running
        return super().lm(ref, dtype, progress)


def test_concurrent_first_requests_load_one_copy():
    source = SlowTinyModels()
    store = ModelStore(source, device="cpu")
    task = source.tasks(load_registry())["image-caption"]
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(store.lm(task)[0])) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert source.built == ["lm facebook/opt-2.7b"] and all(model is results[0] for model in results)
    assert store.loaded() == ["OPT-2.7B language model"]


def test_packing_the_weights_is_a_load_stage_of_its_own():
    source = TinyModels()
    heard: list[str] = []
    store = ModelStore(source, device="cpu", progress=heard.append)
    store.lm(source.tasks(load_registry())["image-caption"])
    packing = [i for i, stage in enumerate(heard) if stage.startswith("Packing the weights of OPT-2.7B")]
    assert heard[0].startswith("Loading OPT-2.7B") and heard[-1].startswith("Loaded OPT-2.7B")
    assert packing and 0 < packing[0] < len(heard) - 1, heard


def test_the_tiny_source_adapts_every_registry_task_to_its_models():
    registry = load_registry()
    tasks = TinyModels().tasks(registry)
    assert tasks.keys() == registry.keys()
    for task_id, task in tasks.items():
        assert task.injection.end_layer <= 6, "injects into the tiny LM's layers"
        assert task.injection.shared_connector == registry[task_id].injection.shared_connector
        assert task.generation == registry[task_id].generation and task.adapter == registry[task_id].adapter


@pytest.mark.parametrize(
    "device, dtype, message",
    [
        ("cpu", "float16", "float16 is for GPUs"),
        ("cpu", "float64", "unknown dtype 'float64'"),
        ("tpu", None, "unknown device"),
    ],
)
def test_bad_device_or_dtype_is_a_user_error(device, dtype, message):
    with pytest.raises(InputError, match=message):
        resolve_dtype(dtype, resolve_device(device))


def test_dtype_names_round_trip():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) is torch.float32
    for name in ("float32", "bfloat16"):
        assert dtype_name(resolve_dtype(name, cpu)) == name


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_request_that_joins_a_load_hears_its_stages_and_bytes(real_hub):
    """The preload downloads the LM; a request that comes meanwhile waits on that download and hears
    what was said before it came (the stage, the bytes so far), then everything after, as the first does."""
    from epalm.errors import Transfer
    from epalm.pretrained import HubModels

    weights = threading.Event()  # the LM's weights stop halfway until the second request has joined
    real_hub.paused["/facebook/opt-2.7b/resolve/main/pytorch_model.bin"] = weights
    store = ModelStore(HubModels(), device="cpu", pack_weights=False)
    task = load_registry(real_hub.registry)["image-caption"]
    first: list[str] = []
    second: list[str] = []
    loads = [threading.Thread(target=store.lm, args=(task, first.append))]
    loads[0].start()
    wait_for(lambda: any(isinstance(m, Transfer) and "pytorch_model.bin" in m and m.done < m.total for m in first))
    loads.append(threading.Thread(target=store.lm, args=(task, second.append)))
    loads[1].start()
    wait_for(lambda: len(second) >= 2)
    weights.set()
    for thread in loads:
        thread.join(60)
    assert second[0] == first[0] == "Loading OPT-2.7B language model…"
    replayed = second[1]
    assert isinstance(replayed, Transfer) and "pytorch_model.bin" in replayed and replayed.done < replayed.total
    assert replayed in first, "the latest byte count when it joined"
    after = first[first.index(replayed) + 1 :]
    assert second[2:] == after, "then every report, as the request that started the load hears them"
    finished = [m for m in second if isinstance(m, Transfer) and m.done == m.total and "pytorch_model.bin" in m]
    assert finished and second[-1].startswith("Loaded OPT-2.7B language model in ")
    assert any(m.startswith("Reading the weights of facebook/opt-2.7b") for m in second)
    assert real_hub.downloads.count("/facebook/opt-2.7b/resolve/main/pytorch_model.bin") == 1
    assert store.loaded() == ["OPT-2.7B language model"]


def test_a_failing_listener_does_not_fail_the_load_others_wait_for():
    source = SlowTinyModels()
    store = ModelStore(source, device="cpu")
    task = source.tasks(load_registry())["image-caption"]

    def broken(message: str) -> None:
        raise RuntimeError("a closed connection")

    heard: list[str] = []
    waiter = threading.Thread(target=lambda: time.sleep(0.05) or store.lm(task, heard.append))
    waiter.start()
    model, _ = store.lm(task, broken)
    waiter.join()
    assert model is store.lm(task)[0] and heard[-1].startswith("Loaded OPT-2.7B language model")


def test_a_failed_load_fails_its_waiters_and_the_next_request_tries_again():
    class FailingOnce(SlowTinyModels):
        def lm(self, ref, dtype, progress=None):
            if not self.built:
                self.built.append("failed")
                time.sleep(0.2)
                raise WeightsUnavailable("Cannot get the language model: offline.", not_cached=True)
            return super().lm(ref, dtype, progress)

    source = FailingOnce()
    store = ModelStore(source, device="cpu")
    task = source.tasks(load_registry())["image-caption"]
    errors: list[Exception] = []

    def request() -> None:
        try:
            store.lm(task)
        except WeightsUnavailable as exc:
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 3 and source.built == ["failed"], "one load, its failure told to each waiter"
    assert "`python -m epalm download image-caption`" in errors[0].detail, "the owner's fix, apart from the message"
    assert "download" not in str(errors[0])
    assert store.lm(task) and source.built == ["failed", "lm facebook/opt-2.7b"]


def test_offline_a_task_whose_adapter_is_not_downloaded_fails_before_any_weight_is_read(
    real_hub, media_files, monkeypatch
):
    """image-vqa's LM and encoder are in the cache, its adapter is not: nothing loads before the refusal."""
    import huggingface_hub.constants as constants

    from epalm import pretrained, weight_files
    from epalm.hub import encoder_files, lm_files, locate
    from epalm.pipeline import Pipeline

    registry = load_registry(real_hub.registry)
    task = registry["image-vqa"]
    locate(lm_files(task.lm))
    locate(encoder_files(task.encoder, task.modality))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    read: list[str] = []
    monkeypatch.setattr(pretrained, "read_weights", lambda *args: read.append("read_weights"))
    monkeypatch.setattr(weight_files, "load", lambda *args: read.append("kept weights"))
    pipe = Pipeline(device="cpu", registry=registry)
    with pytest.raises(WeightsUnavailable) as error:
        pipe.answer(media_files["image"], "what is it", "image-vqa")
    assert str(error.value) == (
        "Cannot get the adapter of image-vqa: checkpoints/float32/ePALM_vqa/checkpoint_best.pth in the Space "
        "mshukor/eP-ALM is not downloaded, and cannot be downloaded now."
    )
    assert "HF_HUB_OFFLINE=1" in error.value.detail and "`python -m epalm download image-vqa`" in error.value.detail
    assert read == [] and pipe.loaded() == [], "no weight was read, nothing loaded"


def test_online_a_wrong_adapter_path_fails_before_the_language_model_downloads(real_hub, media_files, tmp_path):
    import yaml

    from epalm.pipeline import Pipeline

    entries = yaml.safe_load(real_hub.registry.read_text())
    entries["tasks"]["image-caption"]["adapter"]["filename"] = "checkpoints/float32/ePALM_captoin/checkpoint_best.pth"
    registry = tmp_path / "wrong.yaml"
    registry.write_text(yaml.safe_dump(entries))
    pipe = Pipeline(device="cpu", registry=load_registry(registry))
    heard: list[str] = []
    with pytest.raises(WeightsUnavailable, match="there is no checkpoints/float32/ePALM_captoin/checkpoint_best.pth"):
        pipe.caption(media_files["image"], "image-caption", progress=heard.append)
    assert real_hub.downloads == [] and all(r.startswith("HEAD ") for r in real_hub.requests), "nothing downloaded"
    assert heard == [] and pipe.loaded() == []


def test_a_task_to_download_says_how_much_and_each_file_is_checked_once(real_hub, real_repos, media_files):
    from epalm.media import describe_bytes
    from epalm.pipeline import Pipeline

    pipe = Pipeline(device="cpu", registry=load_registry(real_hub.registry), pack_weights=False)
    task = pipe.task("image-caption")
    heard: list[str] = []
    to_download = pipe.store.resolve(task, heard.append)
    heads = len(real_hub.requests)
    lm = ("config.json", "tokenizer_config.json", "vocab.json", "merges.txt", "pytorch_model.bin")
    needed = [("model", "facebook/opt-2.7b", name) for name in lm]
    needed += [("model", "timm/vit_base_patch16_224.augreg_in21k_ft_in1k", "model.safetensors")]
    needed += [("space", task.adapter.repo_id, task.adapter.filename)]
    assert to_download == sum(len(real_repos[key]) for key in needed)
    assert heads and heard == [f"{describe_bytes(to_download)} to download for COCO captions before it can run"]
    assert real_hub.downloads == []
    assert pipe.store.resolve(task, heard.append) == 0
    assert len(real_hub.requests) == heads and len(heard) == 1, "resolved once"
    pipe.caption(media_files["image"], "image-caption", preset="fast", max_new_tokens=2)
    assert sorted(real_hub.downloads) == sorted(
        {f"/{'spaces/' * (t == 'space')}{r}/resolve/main/{f}" for t, r, f in needed}
    )

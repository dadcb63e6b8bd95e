"""Model sources and the model store: device/dtype choice, one load per model, one copy shared."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from epalm.errors import InputError
from epalm.store import ModelStore, dtype_name, resolve_device, resolve_dtype
from epalm.tasks import load_registry
from epalm.tiny import TinyModels


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

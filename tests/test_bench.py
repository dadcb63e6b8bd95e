"""The benchmark on tiny shapes: it runs end to end and writes the JSON and the markdown with the
expected fields, its models come from the library's builders and the registry, and the cached ids
it measures equal the uncached original's."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import ROOT, TINY_BENCH

sys.path.insert(0, str(ROOT))

from bench import models, report, timing
from bench import run as bench_run

TINY = [
    *TINY_BENCH,
    "--repeats",
    "1",
    "--new-tokens",
    "5",
    "--bandwidth-gib",
    "0.03",
    "--probe-mib",
    "8",
    "--quiet-wait",
    "0",
]


@pytest.fixture(scope="module")
def bench_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = TINY + [
        "--modalities",
        "image",
        "audio",
        "--baseline-inputs",
        "image",
        "audio",
        "--in-process",
        "--out",
        str(out / "results.json"),
        "--markdown",
        str(out / "RESULTS.md"),
    ]
    assert bench_run.main(args) == 0
    return json.loads((out / "results.json").read_text()), (out / "RESULTS.md").read_text()


def test_results_json_has_every_measurement(bench_output):
    results, _ = bench_output
    assert {"machine", "configurations", "targets", "command", "wall_s"} <= set(results)
    assert {"cpu", "cpu_count", "torch", "torch_threads"} <= set(results["machine"])
    [config] = results["configurations"]
    assert "error" not in config
    assert config["bandwidth"]["read_gbps"] > 0 and config["bandwidth"]["copy_gbps"] > 0
    assert config["packing"]["linears"] == 6 * 6 + 1 and config["bandwidth"]["gemv_gbps"] > 0, "packing works here"
    assert config["weights"]["decode_weight_bytes"] > 0
    assert set(config["encoders"]) == {"image", "audio"}
    modes = {(r["mode"], r["input"], r["setting"]) for r in config["runs"]}
    for setting in ("paper", "greedy"):
        assert ("hf_generate", None, setting) in modes
        for name in ("image", "audio"):
            assert {
                ("uncached", name, setting),
                ("cached", name, setting),
                ("cached_packed", name, setting),
                ("uncached_packed", name, setting),
            } <= modes
    for run in config["runs"]:
        assert run["new_tokens"] == 5, "decoding is forced to the full length"
        for key in ("first_token_s", "prefill_s", "step_median_s", "per_token_s", "e2e_s", "tokens_per_s"):
            assert run[key]["median"] > 0 and run[key]["min"] <= run[key]["median"] <= run[key]["max"]
        assert run["peak_bytes"] > 0 and len(run["bandwidth_gbps"]) == len(run["per_token_runs_s"]) == run["repeats"]
        if run["mode"] != "hf_generate" and run["mode"] != "hf_generate_packed":
            assert run["encoder_s"]["median"] > 0 and run["first_token_s"]["median"] > run["prefill_s"]["median"]
    assert config["adapters"]["all_tasks_bytes"] > config["adapters"]["one_task_bytes"]
    assert len(config["adapters"]["tasks"]) == 7
    assert {p["kernels"] for p in config["profiles"]} == {"default", "packed"}
    assert all(p["ops"] for p in config["profiles"])


def test_cached_ids_equal_uncached_ids_in_the_bench(bench_output):
    results, _ = bench_output
    checks = results["configurations"][0]["checks"]
    assert len(checks) == 12  # (cached, packed vs default, packed vs packed) x (image, audio) x (paper, greedy)
    assert all(c["identical"] for c in checks), checks
    runs = results["configurations"][0]["runs"]
    hf = [r for r in runs if r["mode"] == "hf_generate"]
    assert all(len(r["ids"]) == 12 + 5 for r in hf), "plain generate: prompt as long as eP-ALM's prefill + new tokens"


def test_markdown_has_machine_targets_and_tables(bench_output, tmp_path):
    results, md = bench_output
    for text in (
        "## Machine",
        "## Targets",
        "## Results",
        "per token ms",
        "ids = uncached",
        "bandwidth",
        "Profile of one cached decode step",
        report.NOTES_START,
        "one task",
    ):
        assert text in md
    assert len(results["targets"]) >= 4
    # hand-written notes, and the sections other benchmarks wrote after them, survive a regeneration
    edited = md.replace("(none yet)", "kept by hand") + "\n## Serving many users\n\n| a table |\n"
    again = report.markdown(results, *report.kept(edited))
    assert "kept by hand" in again and again.endswith("## Serving many users\n\n| a table |\n")


def test_models_come_from_the_registry_at_the_measured_depth():
    from epalm.tasks import load_registry

    registry = load_registry()
    assert models.injection_for("opt-2.7b") == registry["image-caption"].injection
    assert models.injection_for("opt-6.7b") == registry["image-caption-L"].injection
    small = models.injection_for("opt-125m")
    assert (small.start_layer, small.end_layer, small.num_features) == (0, 11, 6), "end stays the last-but-one layer"
    tasks = models.base_tasks("tiny")
    assert [t.id for t in tasks] == [k for k, t in registry.items() if t.lm.id == models.BASE_LM]
    assert all(t.injection.end_layer == 5 for t in tasks)
    ast = models.encoder_spec("real", "audio")
    assert ast == ("transformers", "ASTModel", dict(registry["audio-caption"].encoder.config))
    assert models.encoder_spec("real", "image") == ("timm", "vit_base_patch16_224", {"num_classes": 0})
    lm = models.build_lm("tiny", torch.bfloat16, torch.device("cpu"))
    assert lm.config.num_hidden_layers == 6 and lm.dtype == torch.bfloat16
    positions = (lm.config.max_position_embeddings + 2) * 64 * 2  # OPT offsets positions by 2; bf16: 2 bytes
    assert models.decode_weight_bytes(lm) == models.param_bytes(lm) - positions


def test_cli_defaults_and_quick_plan():
    args = bench_run.parse_args(["--quick"])
    [config] = bench_run.plan(args)
    assert config["lm"] == "opt-125m" and config["encoders"] == "small" and config["dtype"] == "float32"
    assert config["inputs"] == ["image", "video8", "video16", "audio"] and config["baseline_inputs"] == ["image"]
    full = bench_run.plan(bench_run.parse_args([]))
    assert [(c["lm"], c["dtype"]) for c in full] == [("opt-2.7b", "float32"), ("opt-2.7b", "bfloat16")]
    assert full[0]["baseline_inputs"] == ["image"]
    cuda = bench_run.parse_args(["--device", "cuda"])
    assert cuda.dtype == ["float16", "bfloat16"]


def test_device_helpers_do_not_touch_cuda_on_cpu():
    dev = timing.Device(torch.device("cpu"))
    dev.sync()
    with dev.peak_memory() as mem:
        x = torch.ones(1 << 20)
    assert mem["peak_bytes"] >= mem["base_bytes"] > 0
    del x


def test_a_rewritten_section_replaces_its_old_version_and_keeps_the_next_heading_apart(tmp_path):
    path = tmp_path / "RESULTS.md"
    report.write_section(path, "## A\n\nold a\n")
    report.write_section(path, "## B\n\nb\n")
    report.write_section(path, "## A\n\nnew a")  # no trailing newline
    assert path.read_text() == "# eP-ALM benchmark results\n\n## A\n\nnew a\n\n## B\n\nb\n"

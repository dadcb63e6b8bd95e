"""eP-ALM benchmark: latency, throughput and memory at the real model sizes, cached decoding against
the original uncached algorithm, plain transformers `generate`, and the machine's bandwidth bound.

    python bench/run.py                  # full CPU run: OPT-2.7B, fp32 + bf16, every modality (~25 min)
    python bench/run.py --quick          # small shapes only (OPT-125m shape, small encoders; ~2 min)
    python bench/run.py --device cuda --dtype float16 bfloat16

Each (LM shape, dtype) runs in its own subprocess (peak memory per process, no two models held at
once); results go to `--out` (JSON) and `--markdown` (tables + machine). See bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # `python bench/run.py` puts bench/ first, not the repository

import torch  # noqa: E402

from bench import machine, models, report, runs, timing  # noqa: E402
from epalm.store import DTYPES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes only (OPT-125m shape, small encoders)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype", nargs="+", choices=list(DTYPES), help="default: float32 bfloat16 (cpu), float16 bfloat16 (cuda)"
    )
    p.add_argument(
        "--lm", nargs="+", choices=list(models.LM_SHAPES), help="LM shapes (default opt-2.7b; --quick opt-125m)"
    )
    p.add_argument(
        "--encoders", choices=list(models.ENCODER_FAMILIES), help="encoder sizes (default real; --quick small)"
    )
    p.add_argument("--modalities", nargs="+", default=["image", "video", "audio"], choices=list(models.MODALITY_INPUTS))
    p.add_argument("--settings", nargs="+", default=list(runs.SETTINGS), choices=list(runs.SETTINGS))
    p.add_argument("--repeats", type=int, help="timed repetitions per run (default 3; --quick 2)")
    p.add_argument("--uncached-repeats", type=int, default=1, help="repetitions of the slow uncached runs")
    p.add_argument(
        "--baseline-inputs",
        nargs="+",
        default=None,
        help="inputs on which the uncached original and the default-kernel cached decode run "
        "(default: the first, image). The LM's work does not depend on the modality.",
    )
    p.add_argument("--new-tokens", type=int, default=29, help="tokens generated after BOS (paper: max_length 30)")
    p.add_argument("--no-pack", action="store_true", help="skip the packed-weight (oneDNN) runs")
    p.add_argument("--no-hf", action="store_true", help="skip plain transformers generate")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--bandwidth-gib", type=float, default=2.0, help="buffer size of the bandwidth measurement")
    p.add_argument(
        "--probe-mib", type=int, help="buffer of the bandwidth sample around each group of runs (512; --quick 128)"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=300.0,
        help="seconds to wait at most, before each group of runs, for other processes to leave the CPU",
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    p.add_argument("--markdown", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--in-process", action="store_true", help="run configurations here, not in subprocesses")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the configurations already in --out (one measured later replaces the same LM/dtype/device)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)  # path of a worker config (JSON)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = ["float16", "bfloat16"] if args.device == "cuda" else ["float32", "bfloat16"]
        if args.quick:
            args.dtype = args.dtype[:1]
    args.lm = args.lm or (["opt-125m"] if args.quick else ["opt-2.7b"])
    args.encoders = args.encoders or ("small" if args.quick else "real")
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.probe_mib = args.probe_mib or (128 if args.quick else 512)
    return args


def plan(args: argparse.Namespace) -> list[dict]:
    inputs = [name for m in args.modalities for name in models.MODALITY_INPUTS[m]]
    baselines = args.baseline_inputs or [inputs[0]]
    return [
        dict(
            lm=lm,
            dtype=dtype,
            device=args.device,
            encoders=args.encoders,
            inputs=inputs,
            baseline_inputs=[b for b in baselines if b in inputs],
            settings=args.settings,
            repeats=args.repeats,
            uncached_repeats=args.uncached_repeats,
            new_tokens=args.new_tokens,
            pack=not args.no_pack,
            hf=not args.no_hf,
            profile=not args.no_profile,
            threads=args.threads,
            bandwidth_gib=args.bandwidth_gib,
            probe_mib=args.probe_mib,
            quiet_wait_s=args.quiet_wait,
        )
        for lm in args.lm
        for dtype in args.dtype
    ]


# --------------------------------------------------------------------------------------------
# One configuration (LM shape x dtype), normally in its own process


def fits_in_memory(lm_name: str, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    need = models.weight_bytes_estimate(lm_name, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = None
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
        if free is None:
            return True, ""
    ok = need * 1.25 < free
    return ok, f"needs ~{need / 1e9:.1f} GB of weights, {free / 1e9:.1f} GB available"


def run_configuration(config: dict, save) -> dict:
    """Build one LM shape at one dtype with every encoder, then measure. `save(result)` is called
    after each measurement so a crash or a timeout keeps what was done."""
    from epalm.model import EPALM, pack_linear_weights

    device, dtype = torch.device(config["device"]), DTYPES[config["dtype"]]
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    dev = timing.Device(device)
    result: dict = {"lm": config["lm"], "dtype": config["dtype"], "device": config["device"], "config": config}
    result["machine"] = machine.machine_info(device)
    result["notes"] = []
    ok, why = fits_in_memory(config["lm"], dtype, device)
    if not ok:
        result["skipped"] = f"{config['lm']} in {config['dtype']} does not fit: {why}"
        save(result)
        return result
    log = lambda msg: print(f"[{config['lm']} {config['dtype']}] {msg}", flush=True)  # noqa: E731

    log("memory bandwidth")
    result["bandwidth"] = machine.memory_bandwidth(dev, gib=config.get("bandwidth_gib", 2.0))
    save(result)

    log("building models")
    gc.collect()
    rss0, t0 = timing.rss_bytes(), time.perf_counter()
    lm = EPALM(models.build_lm(config["lm"], dtype, device))
    result["build"] = {"lm_s": time.perf_counter() - t0, "lm_rss_delta_bytes": timing.rss_bytes() - rss0}
    injection = models.injection_for(config["lm"])
    modalities = sorted({models.INPUTS[name][0] for name in config["inputs"]})
    encoders, adapters = {}, {}
    for i, modality in enumerate(modalities):
        rss0 = timing.rss_bytes()
        encoders[modality] = models.build_encoder_for(config["encoders"], modality, dtype, device, seed=i)
        adapters[modality] = models.build_adapter(injection, encoders[modality].dim, lm.lm, dtype, device, seed=i)
        result["build"][f"{modality}_rss_delta_bytes"] = timing.rss_bytes() - rss0
    inputs = {
        name: models.encoder_input(name, 1, dtype, device, encoders[models.INPUTS[name][0]])
        for name in config["inputs"]
    }
    work = runs.Workload(
        lm,
        dev,
        injection,
        encoders,
        adapters,
        inputs,
        new_tokens=config["new_tokens"],
        probe_mib=config.get("probe_mib", 512),
        quiet_wait_s=config.get("quiet_wait_s", 300.0),
    )
    result["injection"] = injection.__dict__
    result["weights"] = {
        "lm_param_bytes": models.param_bytes(lm),
        "decode_weight_bytes": models.decode_weight_bytes(lm.lm),
        "encoder_param_bytes": {f: models.param_bytes(e) for f, e in encoders.items()},
        "adapter_param_bytes": {f: models.param_bytes(a) for f, a in adapters.items()},
    }
    result["encoders"], result["runs"], result["linear_floor"], result["profiles"] = {}, [], {}, []
    save(result)

    reps, settings = config["repeats"], config["settings"]
    beams = sorted({runs.SETTINGS[s]["num_beams"] for s in settings})

    def measure(groups: list) -> None:
        for run in runs.interleave(work, groups, log=log):
            result["runs"].append(run)
            log(
                f"{run['mode']:<18} {run['input'] or '-':<8} {run['setting']:<6} "
                f"median e2e {run['e2e_s']['median']:.2f}s per-token {run['per_token_s']['median'] * 1e3:.0f}ms"
            )
        save(result)

    for name in config["inputs"]:
        result["encoders"][name] = runs.measure_encoder(work, name, reps)
        save(result)
        log(f"encoder {name}: {result['encoders'][name]['seconds']['median']:.3f}s")
    result["linear_floor"]["default"] = [machine.linear_floor(lm.lm, dev, rows) for rows in beams]

    # Default kernels: the original algorithm, our cache and plain transformers generate, interleaved.
    groups = [runs.hf_group(work, setting, reps) for setting in settings] if config["hf"] else []
    for name in config["baseline_inputs"]:
        for setting in settings:
            groups.append(runs.epalm_group(work, name, setting, False, config["uncached_repeats"], retries=1))
            groups.append(runs.epalm_group(work, name, setting, True, reps))
    measure(groups)
    if config["profile"]:
        result["profiles"] += [dict(runs.profile_step(work, s), kernels="default") for s in settings]
        save(result)

    result["adapters"] = runs.adapter_memory(work, models.base_tasks(config["lm"]), dtype, device)
    save(result)

    packed = 0
    if config["pack"]:
        gc.collect()
        rss0, t0 = timing.rss_bytes(), time.perf_counter()
        packed = pack_linear_weights(lm)
        gc.collect()
        result["packing"] = {
            "linears": packed,
            "seconds": time.perf_counter() - t0,
            "rss_delta_bytes": timing.rss_bytes() - rss0,
            "head_bytes": models.param_bytes(lm.decoder.embed_tokens),
        }
        if not packed:
            result["notes"].append("weight packing unavailable here (needs CPU + oneDNN, float32/bfloat16)")
    if packed:
        # Packed weights: every input, and transformers generate on the same packed modules.
        log(f"packed {packed} linear layers")
        result["linear_floor"]["packed"] = [machine.linear_floor(lm.lm, dev, rows) for rows in beams]
        groups = [
            runs.epalm_group(work, name, setting, False, config["uncached_repeats"], retries=1, mode="uncached_packed")
            for name in config["baseline_inputs"]
            for setting in settings
        ]
        groups += [
            runs.epalm_group(work, name, setting, True, reps, mode="cached_packed")
            for name in config["inputs"]
            for setting in settings
        ]
        if config["hf"]:
            groups += [runs.hf_group(work, setting, reps, mode="hf_generate_packed") for setting in settings]
        measure(groups)
        if config["profile"]:
            result["profiles"] += [dict(runs.profile_step(work, s), kernels="packed") for s in settings]
    result["checks"] = id_checks(result["runs"])
    result["bandwidth_end"] = machine.memory_bandwidth(dev, gib=config.get("bandwidth_gib", 2.0))
    save(result)
    log("done")
    return result


ID_PAIRS = [("cached", "uncached"), ("cached_packed", "uncached"), ("cached_packed", "uncached_packed")]


def id_checks(runs: list[dict]) -> list[dict]:
    """Cached ids against the uncached original's, same input and setting (and same kernels, or the
    original's default ones)."""
    out = []
    for mode, reference in ID_PAIRS:
        for ref in (r for r in runs if r["mode"] == reference):
            for run in runs:
                if run["mode"] == mode and (run["input"], run["setting"]) == (ref["input"], ref["setting"]):
                    a, b = run["ids"], ref["ids"]
                    diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                    if diff is None and len(a) != len(b):
                        diff = min(len(a), len(b))
                    out.append(
                        dict(
                            mode=mode,
                            reference=reference,
                            input=run["input"],
                            setting=run["setting"],
                            identical=diff is None,
                            first_difference=diff,
                        )
                    )
    return out


# --------------------------------------------------------------------------------------------
# Orchestration


def run_worker(config_path: str, out_path: str) -> int:
    config = json.loads(Path(config_path).read_text())

    def save(result: dict) -> None:
        tmp = Path(out_path + ".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(out_path)

    run_configuration(config, save)
    return 0


def run_subprocess(config: dict, timeout: float | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, out = Path(tmp) / "config.json", Path(tmp) / "result.json"
        cfg.write_text(json.dumps(config))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(cfg), "--worker-out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=None, stderr=subprocess.PIPE, text=True, timeout=timeout)
        result = (
            json.loads(out.read_text())
            if out.exists()
            else {"lm": config["lm"], "dtype": config["dtype"], "config": config}
        )
        result["wall_s"] = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            result["error"] = (
                f"worker exited with {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] if proc.stderr else ''}"
            )
        return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.worker_out)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    started = time.time()
    results = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "command": " ".join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine.machine_info(torch.device(args.device)),
        "load_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "configurations": [],
    }
    if args.append and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        results["configurations"] = previous.get("configurations", [])
        results["command"] = previous.get("command", "") + " ; " + results["command"]
    for config in plan(args):
        key = (config["lm"], config["dtype"], config["device"])
        results["configurations"] = [
            c for c in results["configurations"] if (c["lm"], c["dtype"], c.get("device")) != key
        ]
        print(f"== {config['lm']} {config['dtype']} on {config['device']}", flush=True)
        if args.in_process:
            result = {}
            try:
                run_configuration(config, result.update)
            except Exception:
                result["error"] = traceback.format_exc(limit=3)
        else:
            result = run_subprocess(config)
        results["configurations"].append(result)
        results["wall_s"] = time.time() - started
        results["load_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        results["targets"] = report.targets(results)
        write(results, args)
    print(f"wrote {args.out} and {args.markdown} in {time.time() - started:.0f}s")
    return 0 if all("error" not in c for c in results["configurations"]) else 1


def write(results: dict, args: argparse.Namespace) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    md = Path(args.markdown)
    md.write_text(report.markdown(results, *report.kept(md.read_text())) if md.exists() else report.markdown(results))


if __name__ == "__main__":
    sys.exit(main())

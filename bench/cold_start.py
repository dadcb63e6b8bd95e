"""Cold start: the time from `python app.py` to the first answer, with the files already in the Hub cache,
today's way (the float16 checkpoint read and cast) and from the kept weights (epalm.weight_files), in one run.

    python -m bench.cold_start                          # OPT-2.7B shape, bfloat16 and float32, both ways
    python -m bench.cold_start --dtype bfloat16 --cache /tmp/epalm-cache --keep --repeats 3
    python -m bench.cold_start --layers 2 --dtype float32   # a quick run: 2 OPT layers

Writes a Hugging Face cache holding what `image-caption` needs, in the real repos' layouts, with
random weights at the real shapes: facebook/opt-2.7b's config, a tokenizer and its float16
`pytorch_model.bin` (5.3 GB at 32 layers; the Hub has no safetensors for it), timm's ViT-B/16
`model.safetensors`, and the adapter at its path in the Space mshukor/eP-ALM. Per dtype it then writes
the kept weights (what a first start leaves behind) and starts `python app.py` (a fresh process, offline,
page cache warm: the files the start reads are read just before it) alternately without them (`read`:
EPALM_CACHE=off, today's path) and with them (`kept`), `--repeats` times each; each start submits one
image caption through the API as soon as the server answers and times the server start, the first
streamed token and the final answer (greedy, `--new-tokens`). The parts come from the app's log, where
each load stage is a line with its time: the LM's read and cast (or mapping), its weight packing, the
encoder and the adapter.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # `python bench/cold_start.py` puts bench/ first, not the repository

from bench import machine, report  # noqa: E402
from bench.load import write_repo  # noqa: E402

TASK = "image-caption"
IMAGE = ROOT / "examples" / "image" / "cat.jpg"
# Log lines that mark a part's start or end: (part, "start" | "end", pattern).
MARKS = [
    ("lm_read_and_cast", "start", r"Reading the weights of|Mapping the \w+ weights of"),
    ("lm_read_and_cast", "end", r"Packing the weights of"),
    ("lm_pack", "start", r"Packing the weights of"),
    ("lm_pack", "end", r"packed \d+ linear layers"),
    ("encoder", "start", r"Loading .* image encoder"),
    ("encoder", "end", r"Loaded .* image encoder"),
    ("adapter", "start", r"Loading .* adapter"),
    ("adapter", "end", r"Loaded .* adapter"),
]


def snapshot(cache: Path, repo_type: str, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` at `main` in a Hub cache (what huggingface_hub reads offline)."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit
    path.mkdir(parents=True, exist_ok=True)
    return path


def registry_at_depth(folder: Path, layers: int) -> Path | None:
    """For an LM shallower than OPT-2.7B's 32 layers (a quick run), a copy of the registry in `folder`
    whose OPT-2.7B tasks inject into the layers it has (`bench.models.at_depth`), for the app to read
    (EPALM_TASKS); None at 32 layers, where the registry is used as it is."""
    import yaml

    from bench.models import at_depth
    from epalm.model import InjectionConfig
    from epalm.refs import DEFAULT_REGISTRY

    if layers == 32:
        return None
    registry = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    for entry in registry["tasks"].values():
        if entry["lm"]["id"] == "facebook/opt-2.7b":
            moved = at_depth(InjectionConfig(**entry["injection"]), 32, layers)
            entry["injection"] = {**entry["injection"], "start_layer": moved.start_layer, "end_layer": moved.end_layer}
    path = folder / "tasks.yaml"
    path.write_text(yaml.safe_dump(registry, sort_keys=False))
    return path


def write_cache(cache: Path, layers: int, registry: Path | None = None) -> float:
    """The files `image-caption` needs, in their repos' layouts; returns their size in GB."""
    import safetensors.torch
    import timm

    from epalm.hub import encoder_files, lm_files
    from epalm.model import Adapter
    from epalm.tasks import load_registry
    from epalm.tiny import tiny_tokenizer

    task = load_registry(registry)[TASK]
    lm = snapshot(cache, "model", task.lm.id)
    if not (lm / "pytorch_model.bin").exists():
        write_repo(lm, layers)
        tiny_tokenizer().backend_tokenizer.model.save(str(lm))  # vocab.json and merges.txt, as OPT's repo has
    vit_files = encoder_files(task.encoder, task.modality)
    vit = snapshot(cache, "model", vit_files.repo_id) / "model.safetensors"
    if not vit.exists():
        model = timm.create_model(task.encoder.id, pretrained=False)
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, vit)
    adapter = snapshot(cache, task.adapter.repo_type, task.adapter.repo_id) / task.adapter.filename
    if not adapter.exists():
        config = json.loads((lm / "config.json").read_text())
        state = Adapter(task.injection, 768, config["hidden_size"], config["word_embed_proj_dim"]).state_dict()
        adapter.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state, "epoch": 7}, adapter)
    for files, folder in ((lm_files(task.lm), lm), (vit_files, vit.parent)):
        absent(folder, [name for name in files.optional + files.weights if not (folder / name).exists()])
    return sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e9


def absent(snapshot: Path, names: list[str]) -> None:
    """Mark files as not in the repo, as huggingface_hub does when the Hub answers 404 (what a cache
    filled by `python -m epalm download` holds): offline, the loader then knows to try the next."""
    markers = snapshot.parents[1] / ".no_exist" / snapshot.name
    markers.mkdir(parents=True, exist_ok=True)
    for name in names:
        (markers / name).touch()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"the app did not answer at {url} in {timeout:.0f} s")


def kept_folder(cache: Path) -> Path:
    return cache.parent / f"{cache.name}-kept"


def keep_weights(cache: Path, dtype: str, registry: Path | None = None) -> float:
    """Write the kept weights of image-caption's LM in `dtype` as a first start would (a fresh process);
    returns their size in GB."""
    code = (
        "import torch\n"
        "from epalm import weight_files\n"
        "from epalm.hub import lm_files, locate\n"
        "from epalm.tasks import load_registry\n"
        f"ref = load_registry({str(registry) if registry else None!r})[{TASK!r}].lm\n"
        "weights = [p for n, p in locate(lm_files(ref)).items() if n.endswith(('.bin', '.safetensors'))]\n"
        f"dtype = torch.{dtype}\n"
        "if weight_files.load(ref.id, weights, dtype) is None:\n"
        "    weight_files.keep(ref.id, weights, dtype, 0)\n"
        "    weight_files.finish()\n"
        "print(weight_files.entry_path(ref.id, dtype).stat().st_size)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "EPALM_CACHE": str(kept_folder(cache))}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1e9


def warm(files: list[Path]) -> None:
    """Read these files once, so that the start finds them in the page cache ("from a warm cache"): on a
    machine whose memory cannot hold every file of the run at once, the last start's files push out the
    next one's otherwise."""
    for path in files:
        with path.open("rb", buffering=0) as handle:
            while handle.readinto(WARM_BUFFER):
                pass


WARM_BUFFER = bytearray(16 << 20)


def start_files(cache: Path, dtype: str, kept: bool) -> list[Path]:
    """What a start reads: the LM's kept weights or its checkpoint, and the other files of the task."""
    files = [path for path in cache.rglob("*") if path.is_file() and "opt-2.7b" not in str(path)]
    if kept:
        return [*kept_folder(cache).rglob(f"{dtype}.safetensors"), *files]
    return [*cache.rglob("pytorch_model.bin"), *files]


def start_to_answer(
    cache: Path,
    dtype: str,
    new_tokens: int,
    threads: int,
    kept: bool,
    device: str = "cpu",
    registry: Path | None = None,
) -> dict:
    """One `python app.py` from launch to the first answer (`kept`: with the kept weights), its files in
    the page cache; seconds since launch."""
    from gradio_client import Client, handle_file

    warm(start_files(cache, dtype, kept))
    port = _free_port()
    env = {
        **os.environ,
        **({"EPALM_TASKS": str(registry)} if registry else {}),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "EPALM_CACHE": str(kept_folder(cache)) if kept else "off",
        "EPALM_DTYPE": dtype,
        "EPALM_DEVICE": device,
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": str(threads),
    }
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as log:
        launched_wall, launched = time.time(), time.perf_counter()
        process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            _wait_for_server(url, process, 120)
            server_s = time.perf_counter() - launched
            client = Client(url, verbose=False)
            job = client.submit(handle_file(str(IMAGE)), TASK, "fast", new_tokens, 0.7, 0.9, api_name="/caption_image")
            _, info, *_ = job.result(timeout=600)
            answer_s = time.perf_counter() - launched
            # the info line times the decode: "first token F s · N tokens in G s" (random weights decode to ids
            # the small tokenizer lacks, so the streamed text stays empty and cannot mark the first token)
            first, whole = (
                float(x) for x in re.search(r"first token ([\d.]+) s · \d+ tokens in ([\d.]+) s", info).groups()
            )
            first_token_s = answer_s - (whole - first)
        finally:
            process.terminate()
            process.wait(30)
        log.seek(0)
        lines = log.read().splitlines()
    return {
        "dtype": dtype,
        "weights": "kept" if kept else "read",
        "load_average": f"{load_average:.2f}",
        "server_s": server_s,
        "first_token_s": first_token_s,
        "answer_s": answer_s,
        "parts": parts(lines, launched_wall),
    }


def parts(lines: list[str], launched: float) -> dict[str, dict[str, float]]:
    """Each part's start and end (seconds since launch), from the app log's timestamped lines."""
    found: dict[str, dict[str, float]] = {}
    for line in lines:
        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
        if not stamp:
            continue
        at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - launched
        for part, edge, pattern in MARKS:
            if re.search(pattern, line) and edge not in found.get(part, {}):
                found.setdefault(part, {})[edge] = at
    return found


def _span(parts: dict[str, dict[str, float]], name: str) -> str:
    edges = parts.get(name, {})
    return f"{edges['start']:.1f}–{edges['end']:.1f}" if {"start", "end"} <= set(edges) else "-"


def markdown(results: dict) -> str:
    lines = [
        "## Cold start: `python app.py` to the first answer (bench/cold_start.py)",
        "",
        f"Run on {results['date']}: `{results['command']}`. Machine: {results['machine'].get('cpu', '?')}, "
        f"{results['machine'].get('cpu_count', '?')} cores, torch threads {results['threads']}{_gpu(results)}, "
        f"load average {results['load_average']} at the start. A Hub cache of {results['cache_gb']:.1f} GB with "
        f"`{TASK}`'s files at the real shapes ({results['layers']} OPT layers; float16 `pytorch_model.bin`), random "
        "weights, read offline with the page cache warm. `read`: the checkpoint read and cast at each start "
        "(EPALM_CACHE=off); `kept`: the weights kept by an earlier start, mapped ("
        + ", ".join(f"{dtype} {size:.1f} GB on disk" for dtype, size in results["kept_gb"].items())
        + "). One image caption submitted through the API as soon as the server answers, greedy, "
        f"{results['new_tokens']} new tokens. Seconds since launch; runs in the order they ran (load average at "
        "each launch).",
        "",
        "| dtype | weights | load avg | server up | LM read + cast (or mapped) | LM packing | encoder | adapter | "
        "first token | answer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        span = functools.partial(_span, run["parts"])
        lines.append(
            f"| {run['dtype']} | {run['weights']} | {run['load_average']} | {run['server_s']:.1f} | "
            f"{span('lm_read_and_cast')} | {span('lm_pack')} | {span('encoder')} | {span('adapter')} | "
            f"{run['first_token_s']:.1f} | **{run['answer_s']:.1f}** |"
        )
    return "\n".join(lines) + "\n"


def _gpu(results: dict) -> str:
    info = results["machine"]
    return f", the app on {info['gpu']} (`--device cuda`)" if results.get("device") == "cuda" and "gpu" in info else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=["bfloat16", "float32", "float16"],
        help="default: bfloat16 float32 (cpu), float16 bfloat16 (cuda)",
    )
    p.add_argument("--layers", type=int, default=32, help="OPT layers (32: OPT-2.7B)")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=1, help="starts per dtype and way, alternating read and kept")
    p.add_argument("--cache", help="where to write the Hub cache (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the cache (to rerun without writing it)")
    p.add_argument("--out", default=str(ROOT / "bench" / "cold_start.json"))
    p.add_argument("--markdown", help="write the section into this file (e.g. bench/RESULTS.md)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or (["float16", "bfloat16"] if args.device == "cuda" else ["bfloat16", "float32"])
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="epalm-hub-"))
    load_average = f"{os.getloadavg()[0]:.2f}"
    try:
        registry = registry_at_depth(cache, args.layers)
        cache_gb = write_cache(cache, args.layers, registry)
        runs, kept_gb = [], {}
        for dtype in args.dtype:
            kept_gb[dtype] = keep_weights(cache, dtype, registry)
            for _ in range(args.repeats):
                for kept in (False, True):  # interleaved: a change in the machine's load hits both ways
                    runs.append(
                        start_to_answer(cache, dtype, args.new_tokens, args.threads, kept, args.device, registry)
                    )
    finally:
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(kept_folder(cache), ignore_errors=True)
    results = {
        "command": "python -m bench.cold_start " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine.machine_info(torch.device(args.device)),
        "device": args.device,
        "threads": args.threads,
        "layers": args.layers,
        "new_tokens": args.new_tokens,
        "cache_gb": cache_gb,
        "kept_gb": kept_gb,
        "load_average": load_average,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(results, indent=1))
    text = markdown(results)
    print(text)
    if args.markdown:
        report.write_section(Path(args.markdown), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

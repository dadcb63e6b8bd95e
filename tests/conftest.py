"""Shared fixtures: the reference parity cases and tiny random models (no network)."""

from __future__ import annotations

import base64
import gc
import hashlib
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

# the synthetic tasks the training tests learn, for the tests to import from here (bench/train.py measures the same)
from epalm.synthetic import COLOURS, write_colour_folder, write_tone  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = ROOT / "tests" / "fixtures" / "parity"
TINY_BENCH = ["--lm", "tiny", "--encoders", "tiny", "--dtype", "float32"]  # the benchmarks at the tiny shapes


def _parity_cases() -> list[Path]:
    """The in-repo cases, plus those named by EPALM_PARITY (case folders, or folders of cases,
    separated by the path separator)."""
    roots = [PARITY_DIR] + [Path(p) for p in os.environ.get("EPALM_PARITY", "").split(os.pathsep) if p]
    cases = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"EPALM_PARITY names {root}, which is not a folder")
        is_case = (root / "manifest.json").is_file()
        cases += [root] if is_case else sorted(m.parent for m in root.glob("*/manifest.json"))
    return cases


PARITY_CASES = _parity_cases()

# Gradio keeps uploads in one folder per machine (/tmp/gradio), where an app with `delete_cache` (as
# test_old_uploads_are_deleted starts) deletes every other app's uploads too: another test run's, or another
# pytest-xdist worker's. This process's apps keep theirs in a folder of their own (set before gradio is imported).
GRADIO_TEMP_DIR = tempfile.mkdtemp(prefix="epalm-tests-gradio-")
os.environ["GRADIO_TEMP_DIR"] = GRADIO_TEMP_DIR


def pytest_unconfigure(config) -> None:
    shutil.rmtree(GRADIO_TEMP_DIR, ignore_errors=True)


# tiny models gain nothing from threads, and idle OpenMP workers spin against any other load (this process:
# one thread from pytest_collection_finish on; the subprocesses the tests start: OMP_NUM_THREADS)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_finish(session) -> None:
    """Once the tests are collected, before the first one. torch is set to one thread here, not when this
    file is imported: a pytest-xdist controller imports this file, runs no test and need not import torch.
    What collection imported lives as long as the run: freeze it out of the garbage collector's full passes,
    which would otherwise walk all of it each time."""
    import torch

    torch.set_num_threads(1)
    gc.freeze()


CHROMIUM_HELP = (
    "install Chromium (Debian/Ubuntu: apt-get install chromium; elsewhere: python -m playwright install chromium), "
    "or name its executable in EPALM_CHROMIUM"
)


def chromium_executable(playwright) -> str:
    """The Chromium the browser tests drive: $EPALM_CHROMIUM, a `chromium` on the PATH (Debian's, as
    tests/setup.sh installs it) or the one Playwright downloads. Without any, the tests fail where
    apt-get could have installed it (CI), and are skipped, saying why, only where it could not."""
    named = os.environ.get("EPALM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if named:
        return named
    if Path(playwright.chromium.executable_path).is_file():
        return playwright.chromium.executable_path
    if shutil.which("apt-get"):
        pytest.fail(f"no Chromium for the browser tests: tests/setup.sh installs it with apt-get, or {CHROMIUM_HELP}")
    pytest.skip(f"no Chromium on this machine and no apt-get to install it: {CHROMIUM_HELP}")


@pytest.fixture(scope="session")
def parity_cases() -> list[Path]:
    assert PARITY_CASES, f"no parity fixtures under {PARITY_DIR}"
    return PARITY_CASES


@pytest.fixture(scope="session")
def tokenizer():
    from epalm.tiny import tiny_tokenizer

    return tiny_tokenizer()


class FakeHub:
    """A loopback server that answers like the Hub's resolve endpoint (HEAD + GET with the
    commit and ETag headers huggingface_hub reads), so the real `hf_hub_download` path runs; and
    like its upload API (repo creation, model card check, preupload, commit), so the real
    `create_repo` + `upload_folder` path runs too: each file is a "regular" one, sent base64 in the
    commit, then served by the resolve endpoint. Uploads need `Authorization: Bearer TOKEN`.

    Slow downloads: `bytes_per_s` throttles every GET body; `paused[path]` (an Event) stops that file's
    body halfway until it is set. `commit` is what every branch points at (set another to move them); `not_a_hub`
    answers every file request with a bare 404, as a web server that is not a Hub does."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"
    TOKEN = "hf_fake_write_token"

    def __init__(self) -> None:
        self.commit = self.COMMIT
        self.bytes_per_s: float | None = None
        self.paused: dict[str, threading.Event] = {}
        self.not_a_hub = False
        self.files: dict[str, bytes] = {}
        self.downloads: list[str] = []  # GET paths served with a body
        self.requests: list[str] = []  # "HEAD /path" / "GET /path" / "POST /path", every request
        self.too_many: dict[str, int] = {}  # path -> how many GETs still answer 429 (rate limited)
        self.repos: set[str] = set()  # model repos created by POST /api/repos/create
        self.commits: list[tuple[str, str, dict[str, bytes]]] = []  # (repo, summary, {path: bytes}), in order
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, body: bool) -> None:
                path = self.path.split("?")[0]
                hub.requests.append(f"{self.command} {path}")
                if hub.not_a_hub:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if body and hub.too_many.get(path):
                    hub.too_many[path] -= 1
                    self.send_response(429)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files.get(path)
                if data is None:  # as the Hub answers for a file a repo lacks, with the commit (cached as absent)
                    self.send_response(404)
                    self.send_header("X-Repo-Commit", hub.commit)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Error-Message", "Entry not found")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    hub.downloads.append(path)
                    self._send(data, hub.paused.get(path))

            def _send(self, data: bytes, pause: threading.Event | None) -> None:
                """The body, at `bytes_per_s` if set (in 20 pieces a second), held halfway until `pause` is set."""
                step = max(1, int(hub.bytes_per_s / 20)) if hub.bytes_per_s else len(data)
                halfway = len(data) // 2
                for start in range(0, len(data), step):
                    if pause is not None and start <= halfway < start + step:
                        self.wfile.write(data[start:halfway])
                        self.wfile.flush()
                        pause.wait(60)
                        self.wfile.write(data[halfway : start + step])
                    else:
                        self.wfile.write(data[start : start + step])
                    if hub.bytes_per_s:
                        self.wfile.flush()
                        time.sleep(step / hub.bytes_per_s)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _reply(self, status: int, answer: dict) -> None:
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status == 404:
                    self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # model repos only: what `create_repo` and `upload_folder` send
                path = urllib.parse.unquote(self.path.split("?")[0])
                hub.requests.append(f"POST {path}")
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                upload = re.fullmatch(r"/api/models/(.+/.+)/(preupload|commit)/(.+)", path)
                if self.headers.get("Authorization") != f"Bearer {hub.TOKEN}":
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                elif path == "/api/validate-yaml":
                    self._reply(*self._check_card(json.loads(body)["content"]))
                elif path == "/api/repos/create":
                    repo = "{organization}/{name}".format(**json.loads(body))
                    self._reply(409 if repo in hub.repos else 200, {"url": f"{hub.url}/{repo}"})
                    hub.repos.add(repo)
                elif upload is None or upload[1] not in hub.repos:
                    self._reply(404, {"error": "Repository not found"})
                elif upload[2] == "preupload":  # every file "regular": no LFS or Xet transfer before the commit
                    files = json.loads(body)["files"]
                    self._reply(200, {"files": [{**f, "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                else:
                    self._commit(upload[1], upload[3], [json.loads(line) for line in body.splitlines()])

            @staticmethod
            def _check_card(card: str) -> tuple[int, dict]:
                """The Hub refuses a model card whose metadata (the front matter) is not YAML."""
                try:
                    yaml.safe_load(card.split("---")[1] if card.startswith("---") else "")
                except yaml.YAMLError as exc:
                    return 400, {"errors": [{"message": str(exc)}]}
                return 200, {"errors": [], "warnings": []}

            def _commit(self, repo: str, revision: str, lines: list[dict]) -> None:
                """An NDJSON commit: a header line, then one line per file, its content base64-encoded."""
                files = {}
                for line in lines[1:]:
                    if line["key"] != "file" or line["value"]["encoding"] != "base64":
                        return self._reply(400, {"error": f"the fake Hub takes regular files only, not {line}"})
                    files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                hub.commits.append((repo, lines[0]["value"]["summary"], files))
                for name, data in files.items():
                    hub.add(repo, name, data, revision=revision)
                self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{hub.commit}", "commitOid": hub.commit})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # a short poll: `shutdown()` at the end of each test waits up to one interval
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def add(self, repo_id: str, filename: str, data: bytes, repo_type: str = "model", revision: str = "main") -> None:
        """A file at `revision`; on `main`, also at the commit `main` is now (`commit`), as the Hub resolves it."""
        prefix = {"model": "", "space": "spaces/", "dataset": "datasets/"}[repo_type]
        self.files[f"/{prefix}{repo_id}/resolve/{revision}/{filename}"] = data
        if revision == "main":
            self.files[f"/{prefix}{repo_id}/resolve/{self.commit}/{filename}"] = data


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    """The fake Hub, with HF_ENDPOINT pointed at it and a private HF_HOME cache (for subprocesses
    through the environment, and for this process through huggingface_hub's constants). No token:
    a test that uploads sets HF_TOKEN (to `FakeHub.TOKEN`, or another the fake Hub refuses)."""
    import huggingface_hub.constants as constants

    hub = FakeHub()
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)  # small files report progress as large ones do
    yield hub
    hub.server.shutdown()


def write_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """A small random RGB JPEG/PNG (by suffix)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_video(path: Path, frames: int = 12, size: tuple[int, int] = (64, 48), fps: int = 8, seed: int = 0) -> Path:
    """A short H.264 MP4 of random frames, written with PyAV."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), format="rgb24"
            )
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, freq: float = 440.0) -> Path:
    """A mono 16-bit sine tone."""
    return write_tone(path, freq, seconds, rate)


VQA_QUESTIONS = ["what color is the cat", "how many people are there", "is there a dog", "what is the man holding"]


@pytest.fixture()
def vqa(tmp_path):
    """Six VQAv2 questions about three images named by id (`{image_id}.png`)."""
    folder = tmp_path / "images"
    folder.mkdir()
    questions, annotations = [], []
    for n in range(6):
        image_id = n % 3
        write_image(folder / f"{image_id}.png", seed=image_id)
        qid = 500 + n
        questions.append({"image_id": image_id, "question": VQA_QUESTIONS[n % 4] + "?", "question_id": qid})
        answers = [
            {"answer": a, "answer_confidence": "yes", "answer_id": j} for j, a in enumerate(["yes"] * 6 + ["2"] * 4)
        ]
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "answer_type": "other",
                "question_type": "what",
                "answers": answers,
            }
        )
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": annotations}))
    return tmp_path / "a.json", tmp_path / "q.json", folder


@pytest.fixture(scope="session")
def media_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    return {
        "image": write_image(folder / "photo.jpg"),
        "video": write_video(folder / "clip.mp4"),
        "audio": write_wav(folder / "tone.wav"),
    }


@pytest.fixture()
def encoder_calls():
    """`watch(encoder)`: the batch size of each of its forward calls from now on, appended as they run."""
    hooks = []

    def watch(encoder) -> list[int]:
        calls: list[int] = []
        hooks.append(encoder.register_forward_hook(lambda module, args, output: calls.append(len(args[0]))))
        return calls

    yield watch
    for hook in hooks:
        hook.remove()


def save_numpy1_checkpoint(state: dict, path: Path) -> Path:
    """`torch.save` as the authors' 2023 runs wrote it: pickle protocol 2, with numpy scalars under
    numpy 1's module name (`numpy.core.multiarray.scalar`; this machine has numpy 2's `numpy._core`)."""
    import io
    import zipfile

    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer, pickle_protocol=2)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/data.pkl"):
                data = data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
                assert b"cnumpy.core.multiarray\nscalar\n" in data, "the state holds a numpy scalar"
            out.writestr(info.filename, data)
    return path


# -- the real repos, at reduced sizes --------------------------------------------------------------

REAL_LM_CONFIG = {  # facebook/opt-2.7b's config.json keys, with reduced sizes (32 layers, as the injection needs)
    "_name_or_path": "facebook/opt-2.7b",
    "_remove_final_layer_norm": False,
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "architectures": ["OPTForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "do_layer_norm_before": True,
    "dropout": 0.1,
    "eos_token_id": 2,
    "ffn_dim": 32,
    "hidden_size": 16,
    "init_std": 0.02,
    "layerdrop": 0.0,
    "max_position_embeddings": 128,
    "model_type": "opt",
    "num_attention_heads": 2,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "prefix": "</s>",
    "torch_dtype": "float16",
    "transformers_version": "4.21.0.dev0",
    "use_cache": True,
    "vocab_size": 512,
    "word_embed_proj_dim": 16,
}
REDUCED_VIT = {"embed_dim": 32, "depth": 6, "num_heads": 2}  # registry overrides: timm builds the model from its name
TIMESFORMER, AST = "facebook/timesformer-base-finetuned-k600", "MIT/ast-finetuned-audioset-10-10-0.4593"
_TOKEN = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "__type": "AddedToken"}


def _opt_tokenizer_files() -> dict[str, bytes]:
    """OPT's tokenizer layout (vocab.json + merges.txt, no tokenizer.json), from the tiny BPE."""
    import json
    import tempfile

    from epalm.tiny import tiny_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        tiny_tokenizer().backend_tokenizer.model.save(folder)
        files = {name: (Path(folder) / name).read_bytes() for name in ("vocab.json", "merges.txt")}
    special = {
        "bos_token": {"content": "</s>", **_TOKEN},
        "eos_token": {"content": "</s>", **_TOKEN},
        "unk_token": {"content": "</s>", **_TOKEN},
        "pad_token": {"content": "<pad>", **_TOKEN},
    }
    config = {
        "errors": "replace",
        **special,
        "add_prefix_space": False,
        "special_tokens_map_file": None,
        "name_or_path": "patrickvonplaten/opt-30b",
        "add_bos_token": True,
    }
    files["tokenizer_config.json"] = json.dumps(config).encode()
    files["special_tokens_map.json"] = json.dumps(special).encode()
    return files


def _torch_bytes(state: dict) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer, pickle_protocol=2)
    return buffer.getvalue()


# transformers 5 renamed ViT-style layers (AST's among them); the released checkpoints keep the 4.x names
AST_4X_NAMES = [
    (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"attention\.q_proj", "attention.attention.query"),
    (r"attention\.k_proj", "attention.attention.key"),
    (r"attention\.v_proj", "attention.attention.value"),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"),
    (r"mlp\.fc2", "output.dense"),
]


def ast_4x_name(key: str) -> str:
    import re

    for new, old in AST_4X_NAMES:
        key = re.sub(new, old, key)
    return key


def _transformers_repo(model, rename=lambda key: key) -> dict[str, bytes]:
    """config.json and pytorch_model.bin as transformers 4.x saved them (the classifier's keys)."""
    import json

    config = model.config.to_dict()
    config.update(architectures=[type(model).__name__], transformers_version="4.25.0")
    state = {rename(k): v for k, v in model.state_dict().items()}
    return {"config.json": json.dumps(config).encode(), "pytorch_model.bin": _torch_bytes(state)}


def build_real_repos() -> dict[tuple[str, str, str], bytes]:
    """(repo type, repo id, filename) -> bytes: the layouts of the repos the registry names, with
    random weights at reduced sizes. Files the demo must never fetch are served too."""
    import json

    import numpy as np
    import safetensors.torch
    import timm
    import torch
    from transformers import ASTConfig, ASTForAudioClassification, TimesformerConfig, TimesformerForVideoClassification

    from epalm.model import Adapter
    from epalm.tasks import load_registry

    files: dict[tuple[str, str, str], bytes] = {}
    torch.manual_seed(0)
    opt = {"config.json": json.dumps(REAL_LM_CONFIG).encode(), **_opt_tokenizer_files()}
    opt["generation_config.json"] = b'{"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}'
    from transformers import OPTConfig, OPTForCausalLM

    lm = OPTForCausalLM(OPTConfig(**{k: v for k, v in REAL_LM_CONFIG.items() if not k.startswith("_")}))
    # the original conversion saved OPTModel in float16 ("decoder.*" keys, no lm_head: it is tied)
    decoder = {k.removeprefix("model."): v.half() for k, v in lm.state_dict().items() if k.startswith("model.")}
    opt["pytorch_model.bin"] = _torch_bytes(decoder)
    opt.update({"tf_model.h5": b"never fetched", "flax_model.msgpack": b"never fetched", "README.md": b"# OPT"})
    files.update((("model", "facebook/opt-2.7b", name), data) for name, data in opt.items())

    vit = timm.create_model("vit_base_patch16_224.augreg_in21k_ft_in1k", pretrained=False, **REDUCED_VIT)
    vit_state = safetensors.torch.save({k: v.contiguous() for k, v in vit.state_dict().items()})
    files[("model", "timm/vit_base_patch16_224.augreg_in21k_ft_in1k", "model.safetensors")] = vit_state

    video = TimesformerForVideoClassification(
        TimesformerConfig(
            image_size=224,
            patch_size=32,
            num_frames=8,
            hidden_size=32,
            num_hidden_layers=6,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=600,
        )
    )
    files.update((("model", TIMESFORMER, k), v) for k, v in _transformers_repo(video).items())
    audio = ASTForAudioClassification(
        ASTConfig(
            hidden_size=32,
            num_hidden_layers=6,
            num_attention_heads=2,
            intermediate_size=64,
            max_length=1024,
            num_mel_bins=128,
            num_labels=527,
        )
    )
    ast = _transformers_repo(audio, ast_4x_name)
    ast["model.safetensors"] = safetensors.torch.save({ast_4x_name(k): v for k, v in audio.state_dict().items()})
    files.update((("model", AST, k), v) for k, v in ast.items())

    for task in load_registry().values():
        if task.lm.id != "facebook/opt-2.7b":
            continue
        adapter = Adapter(task.injection, 32, REAL_LM_CONFIG["hidden_size"], REAL_LM_CONFIG["word_embed_proj_dim"])
        with torch.no_grad():
            for linear in adapter.connector:
                linear.weight.normal_(0, 0.5)
        checkpoint = {"model": adapter.state_dict(), "config": {"lr": 2e-5}, "epoch": 7, "best_valid": np.float64(0.61)}
        with __import__("tempfile").TemporaryDirectory() as folder:
            path = save_numpy1_checkpoint(checkpoint, Path(folder) / "checkpoint_best.pth")
            files[("space", task.adapter.repo_id, task.adapter.filename)] = path.read_bytes()
    return files


def reduced_registry(folder: Path) -> Path:
    """The project's registry, with the ViT sizes of the reduced timm checkpoints."""
    import yaml

    from epalm.refs import DEFAULT_REGISTRY

    registry = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    for task in registry["tasks"].values():
        if task["encoder"]["library"] == "timm":
            task["encoder"] = {**task["encoder"], "config": REDUCED_VIT}
    path = folder / "tasks.yaml"
    path.write_text(yaml.safe_dump(registry))
    return path


@pytest.fixture(scope="session")
def real_repos() -> dict[tuple[str, str, str], bytes]:
    return build_real_repos()


@pytest.fixture()
def real_hub(fake_hub, real_repos, tmp_path):
    """The fake Hub serving the real repos' layouts; `real_hub.registry` is the matching registry file."""
    for (repo_type, repo_id, filename), data in real_repos.items():
        fake_hub.add(repo_id, filename, data, repo_type=repo_type)
    fake_hub.registry = reduced_registry(tmp_path)
    return fake_hub

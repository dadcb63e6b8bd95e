"""--ray: a tiny evaluation, and a dataset captioned, on a local Ray cluster with 2 workers give the
predictions of the one-process run, gathered into the same files."""

from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
import pytest

from epalm.__main__ import main
from epalm.evaluation import Request, Runner
from epalm.scale import ScaleError


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local cluster for the file, shut down after it (the commands join it)."""
    ray = pytest.importorskip(
        "ray", reason='--ray needs Ray: pip install "epalm[scale]" (requirements-test.txt has it)'
    )
    yield
    ray.shutdown()


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_on_two_ray_workers_matches_one_process(vqa, tmp_path, capsys):
    annotations, questions, media = vqa
    files = [
        "--annotations",
        annotations,
        "--questions",
        questions,
        "--media",
        media,
        "--image-pattern",
        "{image_id}.png",
    ]
    settings = ["--tiny", "--device", "cpu", "--max-new-tokens", "4", "--no-progress"]
    assert run(capsys, "eval", "image-vqa", *files, *settings, "--out", tmp_path / "one")[0] == 0
    code, text, err = run(
        capsys, "eval", "image-vqa", *files, *settings, "--out", tmp_path / "ray", "--ray", "--workers", "2"
    )
    assert code == 0, err
    one, ray = (json.loads((tmp_path / name / "predictions.json").read_text()) for name in ("one", "ray"))
    assert len(one) == 6 and one == ray
    assert len({r["answer"] for r in one}) > 1, "different questions, different answers: the order matters"
    assert (
        json.loads((tmp_path / "ray" / "metrics.json").read_text())["metrics"]
        == json.loads((tmp_path / "one" / "metrics.json").read_text())["metrics"]
    )
    assert len((tmp_path / "ray" / "predictions.jsonl").read_text().splitlines()) == 6


def test_dataset_bytes_captioned_on_ray_match_one_process(vqa, tmp_path, capsys, monkeypatch):
    """A dataset that stores its files' bytes (as Hub datasets do) goes through Ray whole."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    _, _, media = vqa
    pictures = [{"bytes": (media / f"{n}.png").read_bytes(), "path": None} for n in range(3)]
    folder = tmp_path / "dataset"
    folder.mkdir()
    table = datasets.Dataset.from_dict({"image": pictures}).cast_column("image", datasets.Image())
    table.to_parquet(str(folder / "test.parquet"))
    fast = ["--tiny", "--device", "cpu", "--task", "image-caption", "--preset", "fast", "--max-new-tokens", "4"]
    assert run(capsys, "caption", "--dataset", folder, *fast, "--out", tmp_path / "one.jsonl")[0] == 0
    code, _, err = run(
        capsys, "caption", "--dataset", folder, *fast, "--out", tmp_path / "ray.parquet", "--ray", "--workers", "2"
    )
    assert code == 0, err
    one = {row["key"]: row["answer"] for row in map(json.loads, (tmp_path / "one.jsonl").read_text().splitlines())}
    assert pq.read_table(tmp_path / "ray.parquet").to_pylist() == [
        {"key": n, "answer": one[n], "error": None} for n in range(3)
    ]


def test_without_ray_the_message_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    runner = Runner({"tiny": True}, ray="local")
    with pytest.raises(ScaleError, match=r'pip install "epalm\[scale\]"'):
        list(runner.run("image-caption", [Request(0, "x.jpg")], {}))

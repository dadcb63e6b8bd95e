"""pyproject.toml against the pinned requirement files, the console script and the packaged registry."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from epalm import refs, tasks

from conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(name: str) -> dict[str, Requirement]:
    lines = (ROOT / name).read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(r.name): r for r in reqs}


def ranged(*groups: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(line) for group in groups for line in group]
    return {canonicalize_name(r.name): r for r in reqs if canonicalize_name(r.name) != "epalm"}


def check_in_step(pins: dict[str, Requirement], ranges: dict[str, Requirement]) -> None:
    assert sorted(pins) == sorted(ranges), "the same packages on both sides"
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{name} is not pinned in the requirements file"
        assert ranges[name].specifier.contains(spec.version, prereleases=True), f"{pin} is outside {ranges[name]}"
        assert str(pin.marker) == str(ranges[name].marker), f"{name}: different environment markers"


def test_requirements_txt_pins_what_pyproject_requires():
    project = PROJECT["project"]
    check_in_step(pinned("requirements.txt"), ranged(project["dependencies"], project["optional-dependencies"]["app"]))


def test_requirements_test_txt_pins_the_test_extra():
    extra = PROJECT["project"]["optional-dependencies"]["test"]
    assert "epalm[app]" in extra, "the tests run the app"
    check_in_step(pinned("requirements-test.txt"), ranged(extra))


def test_ray_is_an_extra_the_tests_install_as_users_do():
    """`pip install "epalm[scale]"` gives users the Ray the tests of --ray run on; the app needs none."""
    project = PROJECT["project"]
    scale, test = ranged(project["optional-dependencies"]["scale"]), ranged(project["optional-dependencies"]["test"])
    assert "ray" in scale and all(str(test.get(name)) == str(req) for name, req in scale.items())
    assert "ray" not in ranged(project["dependencies"], project["optional-dependencies"]["app"])


def test_decord_is_only_required_where_it_has_wheels():
    decord = pinned("requirements.txt")["decord"]
    for platform, machine, wanted in [
        ("linux", "x86_64", True),
        ("win32", "AMD64", True),
        ("darwin", "arm64", False),
        ("linux", "aarch64", False),
    ]:
        assert decord.marker.evaluate({"sys_platform": platform, "platform_machine": machine}) is wanted


def test_console_script_is_the_cli():
    module, _, function = PROJECT["project"]["scripts"]["epalm"].partition(":")
    assert getattr(importlib.import_module(module), function) is importlib.import_module("epalm.__main__").main


def test_installed_package_finds_its_registry(tmp_path, monkeypatch):
    """A wheel has no checkpoints/ folder: the build copies the registry into the package (the
    force-include below), and epalm.refs falls back to that copy. Laid out here as pip installs it
    and imported under another name (the torch and transformers already imported are reused)."""
    ((source, target),) = PROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"].items()
    assert (ROOT / source).resolve() == refs.DEFAULT_REGISTRY
    package = tmp_path / "site-packages" / "epalm"
    shutil.copytree(ROOT / "epalm", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / source, package.parent / target)
    spec = importlib.util.spec_from_file_location(
        "installed_epalm", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    sys.modules["installed_epalm"] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(sys.modules["installed_epalm"])
        installed = importlib.import_module("installed_epalm.tasks")
        installed_refs = importlib.import_module("installed_epalm.refs")
    finally:
        for name in [m for m in sys.modules if m.partition(".")[0] == "installed_epalm"]:
            del sys.modules[name]
    assert installed_refs.DEFAULT_REGISTRY == package.parent / target
    monkeypatch.delenv("EPALM_TASKS", raising=False)
    assert installed.load_registry().keys() == tasks.load_registry(ROOT / source).keys()


def test_package_exports_resolve_on_first_use():
    """`import epalm` is light (the CLI's --help, the app's flags); each name it exports is, on first use, the
    object its own module defines."""
    code = "import sys, epalm; print('torch' in sys.modules); epalm.Pipeline; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr
    import epalm

    for name in epalm.__all__:
        value = getattr(epalm, name)
        if callable(value) and hasattr(value, "__module__"):  # a class or function: where it was defined
            assert value.__module__.startswith("epalm.") and getattr(sys.modules[value.__module__], name) is value
    assert set(epalm.__all__) <= set(dir(epalm))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        epalm.nope  # noqa: B018


def test_torch_torchvision_and_torchaudio_ranges_are_one_release_line_each():
    """They are released together (torch 2.N with torchvision 0.(N+15) and torchaudio 2.N). A range that
    spans several lines lets pip pair builds that do not work together: `pip install .` resolved torch
    2.14.1 with torchaudio 2.11.1 (which requires only torch>=2.11)."""
    ranges = ranged(PROJECT["project"]["dependencies"])

    def lines(name: str, major: int) -> set[int]:
        spec = ranges[name].specifier
        return {minor for minor in range(60) if any(spec.contains(f"{major}.{minor}.{p}") for p in range(10))}

    torch_lines = lines("torch", 2)
    assert len(torch_lines) == 1, f"torch spans the release lines 2.{sorted(torch_lines)}"
    assert lines("torchaudio", 2) == torch_lines
    assert lines("torchvision", 0) == {minor + 15 for minor in torch_lines}


def _wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    """A stand-in wheel: only what a resolver reads (its name, version and dependencies)."""
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    metadata = "".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"] + [f"Requires-Dist: {r}\n" for r in requires]
    )
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{stem}.dist-info/METADATA", metadata)
        wheel.writestr(
            f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{stem}.dist-info/RECORD", "")
    return path


def _index(root: Path, wheels: list[Path]) -> str:
    """A PEP 503 simple index of `wheels` under root/simple, as a file:// URL."""
    for wheel in wheels:
        project = root / "simple" / canonicalize_name(wheel.name.split("-")[0])
        project.mkdir(parents=True, exist_ok=True)
        with (project / "index.html").open("a") as page:
            page.write(f'<a href="{wheel.as_uri()}">{wheel.name}</a>\n')
    return (root / "simple").as_uri()


def _resolve(requirements: Path, index: str) -> dict[str, str]:
    """What `pip install -r requirements` would install, from `index` alone: {name: version}."""
    report = requirements.parent / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "--index-url",
            index,
            "-r",
            str(requirements),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }


@pytest.mark.skipif(sys.platform != "linux", reason="PyPI's CUDA builds of torch are Linux's")
def test_the_cpu_requirements_install_pytorchs_cpu_builds_without_cuda(tmp_path):
    """requirements-cpu.txt through pip's own resolver. This machine cannot reach PyTorch's index, so two
    local indexes stand in with what matters of each: PyPI's torch 2.9.1 pulls nvidia-* packages and triton,
    the CPU index has 2.9.1+cpu builds that pull none; every other pin is a plain stand-in wheel. pip must
    take the CPU builds for requirements-cpu.txt, and (the stand-ins' check) PyPI's for requirements.txt."""
    pins = {name: next(iter(req.specifier)).version for name, req in pinned("requirements.txt").items()}
    cuda = ["nvidia-cublas-cu12==12.8.4.1", "nvidia-cudnn-cu12==9.10.2.21", "triton==3.5.1"]
    pypi, cpu = tmp_path / "pypi-files", tmp_path / "cpu-files"
    pypi.mkdir(), cpu.mkdir()
    needs_torch = {"torchvision", "torchaudio"}
    stand_ins = [
        _wheel(
            pypi, name, version, cuda if name == "torch" else [f"torch=={pins['torch']}"] if name in needs_torch else []
        )
        for name, version in pins.items()
    ] + [_wheel(pypi, *req.split("==")) for req in cuda]
    builds = [
        _wheel(cpu, name, f"{pins[name]}+cpu", [] if name == "torch" else [f"torch=={pins['torch']}"])
        for name in ("torch", *needs_torch)
    ]
    pypi_index, cpu_index = _index(tmp_path / "pypi", stand_ins), _index(tmp_path / "cpu", builds)
    files = tmp_path / "requirements"
    files.mkdir()
    shutil.copy(ROOT / "requirements.txt", files)
    text = (ROOT / "requirements-cpu.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu\n" in text and "-r requirements.txt\n" in text
    (files / "requirements-cpu.txt").write_text(text.replace("https://download.pytorch.org/whl/cpu", cpu_index))

    plain = _resolve(files / "requirements.txt", pypi_index)
    assert plain["torch"] == pins["torch"] and "triton" in plain and any(n.startswith("nvidia-") for n in plain)
    cpu_only = _resolve(files / "requirements-cpu.txt", pypi_index)
    for name in ("torch", *needs_torch):
        assert cpu_only[name] == f"{pins[name]}+cpu", (name, cpu_only[name])
    assert not [n for n in cpu_only if n.startswith("nvidia-") or n == "triton"], sorted(cpu_only)
    assert set(cpu_only) == set(plain) - {"triton", *(n for n in plain if n.startswith("nvidia-"))}

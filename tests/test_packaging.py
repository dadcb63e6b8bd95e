"""pyproject.toml against the pinned requirement files, the console script and the packaged registry."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

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

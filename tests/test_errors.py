"""Every error meant for a person derives from `UserError`, so the CLI and the app map them in one place."""

from __future__ import annotations

import pytest

from epalm import AdapterError, InputError, MediaError, OutOfMemory, UserError, WeightsUnavailable
from epalm.__main__ import main
from epalm.tasks import RegistryError


@pytest.mark.parametrize(
    "error", [AdapterError, InputError, MediaError, OutOfMemory, RegistryError, WeightsUnavailable]
)
def test_user_errors_share_one_base(error):
    assert issubclass(error, UserError)


def test_the_cli_reports_a_broken_registry_as_a_user_error(tmp_path, capsys, media_files):
    broken = tmp_path / "tasks.yaml"
    broken.write_text("tasks: {image-caption: {modality: image}}\n")
    assert (
        main(["caption", "--tiny", "--registry", str(broken), "--task", "image-caption", str(media_files["image"])])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: task 'image-caption': ") and "Traceback" not in err

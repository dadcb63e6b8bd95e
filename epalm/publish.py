"""Publishing an adapter folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError

from .adapter_format import ADAPTER_FILES
from .errors import UserError, WeightsUnavailable
from .hub import is_repo_id


def check_push(repo_id: str) -> None:
    """Refuse an upload that cannot be made before any work for it (a training run): a repo id the
    adapter could not be used back from, or no token (the Hub takes no anonymous uploads)."""
    if not is_repo_id(repo_id):
        raise UserError(f"Cannot upload to {repo_id!r}: give a Hub repo id (user/name), as --adapter will take it.")
    if get_token() is None:
        raise WeightsUnavailable(
            f"Uploading to {repo_id} needs a Hugging Face token with write access: "
            "log in with `hf auth login` (or set HF_TOKEN)."
        )


def push_to_hub(folder: str | Path, repo_id: str, allow_patterns: list[str] | None = None) -> str:
    """Upload an adapter folder to a model repo (created if need be); returns the repo's URL. Only
    the files matching `allow_patterns` go, by default the adapter's own (`ADAPTER_FILES`): never
    whatever else the folder holds."""
    check_push(repo_id)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message="Add eP-ALM adapter",
            allow_patterns=allow_patterns or ADAPTER_FILES,
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        said = f"the Hub answered {status} ({exc.server_message or str(exc).splitlines()[0]})"
        login = "; log in with `hf auth login`, with a token that may write to it" if status in (401, 403) else ""
        raise WeightsUnavailable(f"Cannot upload to {repo_id}: {said}{login}.") from exc
    except ValueError as exc:  # a model card the Hub refuses, a folder that is not there
        raise WeightsUnavailable(f"Cannot upload to {repo_id}: {exc}") from exc
    except Exception as exc:  # connection refused, DNS, timeout, offline mode: the HTTP client's own errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsUnavailable(
            f"Cannot upload to {repo_id}: the Hub ({hub_constants.ENDPOINT}) cannot be reached: {reason}."
        ) from exc
    return str(url)

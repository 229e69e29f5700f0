"""Finding pretrained parts by hub id or local folder, and loading them, with errors that say what to do.

A part is named by `model.<part>.name_or_path`: a local folder, or a Hugging Face hub id that resolves
through the hub cache (`HF_HUB_CACHE`), downloading when the hub is reachable. Diffusers parts may live in a
sub-folder of a whole pipeline (`unet/`, `vae/` of an SD-1.5 repo or of its downloaded folder), found for
hub ids and folders alike. Three failures are told apart, each with the command that fixes it: a hub id
that is not in the cache while the hub is offline, a repo or folder that does not exist, and a repo or
folder without the part's sub-folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# The hub's own rule for repo ids: `name` or `org/name` of word characters, dots and dashes.
REPO_ID = re.compile(r"^[\w.\-]{1,96}(/[\w.\-]{1,96})?$")


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or _offline_flag() is not None


def _offline_flag() -> str | None:
    """The variable that makes this process offline, as `NAME=value`, or None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "0").lower() not in ("0", "", "false", "no"):
            return f"{name}={os.environ[name]}"
    return None


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@dataclass(frozen=True)
class Source:
    """Where a part loads from: `load(name_or_path, subfolder=...)`."""

    name_or_path: str
    subfolder: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"subfolder": self.subfolder} if self.subfolder else {}


class PretrainedNotFound(OSError):
    """A pretrained part that cannot be found; the message names the config key and the fix."""


def is_hub_id(name: str) -> bool:
    """A hub id (`gpt2`, `org/name`), not a path: paths are absolute, start with `.`/`~`, or are deeper."""
    return bool(REPO_ID.match(name)) and not name.startswith((".", "~")) and not os.path.exists(name)


def _download_hint(repo: str, key: str, subfolder: str | None, partial: bool = False) -> str:
    """The command that fetches the part; `partial`: the repo is a pipeline already in the cache without it."""
    folder = f"/models/{repo.rsplit('/', 1)[-1]}"
    include = f" --include '{subfolder}/*'" if partial else ""
    hint = (
        f"Download it where there is network (`hf download {repo}{include} --local-dir {folder}`), copy the folder "
        f"here and set {key}={folder}"
    )
    if subfolder and not partial:
        hint += f" (of a whole pipeline, `--include '{subfolder}/*'` fetches only this part)"
    return hint


CONFIG = ("config.json",)
TOKENIZER = ("tokenizer_config.json", "tokenizer.json")


def locate(name_or_path: str, key: str, subfolder: str | None = None, markers: tuple[str, ...] = CONFIG) -> Source:
    """The part's `Source`: `<subfolder>/` of a pipeline when it has one, else the top of the repo or folder.
    A folder holds the part when it has one of the `markers` (a model's config.json, a tokenizer's files)."""
    if not is_hub_id(name_or_path):
        return _locate_folder(name_or_path, key, subfolder, markers)
    return _locate_on_hub(name_or_path, key, subfolder, markers)


def _locate_folder(path: str, key: str, subfolder: str | None, markers: tuple[str, ...]) -> Source:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PretrainedNotFound(
            f"{key}={path!r}: no such folder. Give a folder that holds the model (its config.json), or a hub id; "
            f"to fetch one: `hf download <hub id> --local-dir {path}`."
        )
    for sub in [subfolder, None] if subfolder else [None]:
        if any((folder / (sub or "") / m).is_file() for m in markers):
            return Source(str(folder), sub)
    found = sorted(p.name for p in folder.iterdir())[:12]
    wanted = f"{subfolder}/{markers[0]} or {markers[0]}" if subfolder else " or ".join(markers)
    raise PretrainedNotFound(
        f"{key}={path!r}: the folder has no {wanted} (it holds {found}). Point {key} at the model's own folder"
        + (f" or at a pipeline folder with a {subfolder}/ sub-folder" if subfolder else "")
        + "; a complete download is `hf download <hub id> --local-dir <folder>`."
    )


def _locate_on_hub(repo: str, key: str, subfolder: str | None, markers: tuple[str, ...]) -> Source:
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError

    candidates = [subfolder, None] if subfolder else [None]
    if offline():
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.file_download import repo_folder_name

        for sub in candidates:
            if any(isinstance(try_to_load_from_cache(repo, f"{sub}/{m}" if sub else m), str) for m in markers):
                return Source(repo, sub)
        cached = (hub_cache() / repo_folder_name(repo_id=repo, repo_type="model")).is_dir()
        if not cached:
            raise PretrainedNotFound(
                f"{key}={repo!r}: not in the local Hugging Face cache ({hub_cache()}) and the hub is offline here "
                f"({_offline_flag() or 'HF_HUB_OFFLINE'}). {_download_hint(repo, key, subfolder)}; or unset it "
                "where the hub is reachable."
            )
        raise _no_subfolder(repo, key, subfolder, markers, "its cached copy", partial=True)
    unreachable: Exception | None = None
    for sub in candidates:
        try:
            _download_any(repo, sub, markers)
            return Source(repo, sub)
        except RepositoryNotFoundError as err:
            raise PretrainedNotFound(
                f"{key}={repo!r}: no such repo on the Hugging Face hub (or it is private or gated: log in with "
                f"`hf auth login`). Check the id, or give a local folder: {key}=/models/<name>."
            ) from err
        except LocalEntryNotFoundError as err:  # the hub is unreachable and this file is not cached
            unreachable = err  # the next candidate (the repo's top) may still be in the cache
        except RemoteEntryNotFoundError:
            continue
    if unreachable is not None:
        raise PretrainedNotFound(
            f"{key}={repo!r}: the hub could not be reached and the part is not in the local cache ({hub_cache()}). "
            f"{_download_hint(repo, key, subfolder)}; with a cache copied here, set HF_HUB_OFFLINE=1."
        ) from unreachable
    raise _no_subfolder(repo, key, subfolder, markers, "the repo")


def _download_any(repo: str, subfolder: str | None, markers: tuple[str, ...]) -> None:
    """Fetch the first of `markers` the repo has there; RemoteEntryNotFoundError when it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for marker in markers[:-1]:
        try:
            hf_hub_download(repo, marker, subfolder=subfolder)
            return
        except RemoteEntryNotFoundError:
            continue
    hf_hub_download(repo, markers[-1], subfolder=subfolder)


def _no_subfolder(
    repo: str, key: str, subfolder: str | None, markers: tuple[str, ...], where: str, partial: bool = False
) -> PretrainedNotFound:
    what = f"no {subfolder}/{markers[0]} and no {markers[0]} at its top" if subfolder else f"no {markers[0]}"
    return PretrainedNotFound(
        f"{key}={repo!r}: {where} has {what}, so it holds no such part"
        + (f" (a whole pipeline keeps it in {subfolder}/)" if subfolder else "")
        + f". Name a repo that has it, or fetch the missing files: {_download_hint(repo, key, subfolder, partial)}."
    )


def load_pretrained(
    load: Callable[..., T],
    name_or_path: str,
    key: str,
    subfolder: str | None = None,
    markers: tuple[str, ...] = CONFIG,
    **kwargs: Any,
) -> T:
    """`load(...)` from where `locate` finds the part; a loader's own failure keeps its message, with the key."""
    source = locate(name_or_path, key, subfolder, markers)
    try:
        return load(source.name_or_path, **source.kwargs(), **kwargs)
    except OSError as err:
        raise OSError(f"{key}={name_or_path!r}: {err}") from err
    except ValueError as err:
        raise ValueError(f"{key}={name_or_path!r}: {err}") from err

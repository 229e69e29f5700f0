"""Loading pretrained parts by hub name or local folder, or building them from a config, with errors that say
what to do when a name cannot be downloaded."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ) not in ("0", "", "false")


def load_pretrained(load: Callable[..., T], name_or_path: str, key: str, **kwargs: Any) -> T:
    """`load(name_or_path, **kwargs)`, turning "cannot download" into an error that names the config key."""
    try:
        return load(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.isdir(name_or_path):
            raise
        how = "the hub is offline here (HF_HUB_OFFLINE=1)" if offline() else "it could not be downloaded"
        raise OSError(
            f"{key}={name_or_path!r}: {how}. Download it where there is network "
            f"(`hf download {name_or_path}`, then copy the folder) and pass the local folder: "
            f"{key}=/path/to/{name_or_path.rsplit('/', 1)[-1]}. ({type(err).__name__}: {str(err)[:200]})"
        ) from err

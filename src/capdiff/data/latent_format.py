"""The `latents.npy` member of cached shards (capdiff.data.cache_latents): the VAE posterior's mean and std."""

from __future__ import annotations

import io

import numpy as np
import torch

from capdiff.data.decode import BadSample

LATENTS = "latents.npy"


def encode_latents(mean_std: np.ndarray) -> bytes:
    """(mean, std) stacked as 2×C×h×w → `latents.npy` bytes: float32, never a pickle."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(mean_std, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def decode_latents(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """`latents.npy` bytes → (mean, std), each C×h×w float32; an object array (a pickle) is a bad sample."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise BadSample("bad_latents", str(err)) from err
    if array.ndim != 4 or array.shape[0] != 2:
        raise BadSample("bad_latents", f"expected 2×C×h×w (mean, std), got {array.shape}")
    tensor = torch.from_numpy(array.astype(np.float32, copy=False))
    return tensor[0], tensor[1]

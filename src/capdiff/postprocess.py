"""Post-processing of generated images: a chain of steps, built from config, on B×3×H×W batches in [-1, 1].

- `color` corrects the colour drift of a generator (casts, washed-out or over-saturated samples) against a
  reference set such as the training images. `method="mean_std"` matches each image's per-channel mean and
  standard deviation to the reference's (Reinhard et al., 2001, "Color Transfer between Images"); `"histogram"`
  maps each channel through the image's own CDF onto the reference's quantiles (histogram matching, Gonzalez &
  Woods, "Digital Image Processing", §3.3), which also corrects the shape of the distribution, not only its first
  two moments. Both work in RGB, not in Reinhard's lαβ: the drift to undo is a per-channel cast or contrast change
  of the decoder's output rather than a transfer between unrelated photographs, and lαβ's logarithm is undefined
  at the black pixels that generated images do contain. Each image is matched on its own, so an image does not
  change with the batch it is processed in.
- `median` (a median filter) removes impulse noise: isolated outlier pixels, such as decoder speckles.
- `bilateral` (Tomasi & Manduchi, 1998, "Bilateral Filtering for Gray and Color Images") smooths Gaussian-like
  noise while keeping edges: neighbours are weighted by their distance both in space and in colour.
- `sharpen` is unsharp masking: the image plus `amount` times its difference from a Gaussian blur of it.

The filters are kornia's. Steps run in float32 whatever the input dtype; the result is clamped to [-1, 1] and
comes back in the input's dtype, on its device.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from kornia.filters import bilateral_blur, median_blur, unsharp_mask

from capdiff.data.transforms import as_unit

Step = Callable[[torch.Tensor], torch.Tensor]


@dataclass(eq=False)
class Reference:
    """Per-channel statistics of a reference image set in [-1, 1]: `mean` and `std` (3,), `quantiles` (3, levels)
    at evenly spaced probabilities from 0 to 1."""

    mean: torch.Tensor
    std: torch.Tensor
    quantiles: torch.Tensor

    def __post_init__(self) -> None:
        if (
            self.mean.shape != (3,)
            or self.std.shape != (3,)
            or self.quantiles.ndim != 2
            or self.quantiles.shape[0] != 3
        ):
            raise ValueError(
                f"A Reference holds mean (3,), std (3,) and quantiles (3, levels); got {tuple(self.mean.shape)}, "
                f"{tuple(self.std.shape)} and {tuple(self.quantiles.shape)}."
            )
        if self.quantiles.shape[1] < 2:
            raise ValueError("A Reference needs at least 2 quantile levels, the lowest and the highest value.")

    @classmethod
    def from_images(cls, batches: Iterable[torch.Tensor], levels: int = 256, bins: int = 4096) -> Reference:
        """Statistics of every pixel of a stream of B×3×H×W batches (float in [-1, 1], or uint8 as the data
        loaders yield them), e.g. `Reference.from_images(b["pixels"] for b in loader)`.

        Memory stays bounded without subsampling: the moments are running float64 sums and the quantiles come
        from a per-channel histogram of `bins` bins, exact to a bin's width (2 / `bins`; 4096 bins resolve
        finer than 8-bit levels).
        """
        total = torch.zeros(3, dtype=torch.float64)
        squares = torch.zeros(3, dtype=torch.float64)
        counts = torch.zeros(3, bins, dtype=torch.float64)
        for batch in batches:
            x = _check_images(as_unit(batch)).float().clamp(-1, 1)
            total += x.sum((0, 2, 3), dtype=torch.float64).cpu()
            squares += x.square().sum((0, 2, 3), dtype=torch.float64).cpu()
            index = ((x + 1) * (bins / 2)).long().clamp_(max=bins - 1)
            index += torch.arange(3, device=x.device).view(1, 3, 1, 1) * bins
            counts += torch.bincount(index.flatten(), minlength=3 * bins).view(3, bins).cpu()
        n = counts[0].sum()
        if n == 0:
            raise ValueError("Reference.from_images got no images: the iterable of batches was empty.")
        mean = total / n
        cdf = torch.cat([torch.zeros(3, 1, dtype=torch.float64), counts.cumsum(-1) / n], dim=-1)
        edges = torch.linspace(-1, 1, bins + 1, dtype=torch.float64).expand(3, -1)
        probabilities = torch.linspace(0, 1, levels, dtype=torch.float64).repeat(3, 1)
        quantiles = _interpolate(probabilities, cdf, edges)
        # The lowest quantile is the left edge of the first non-empty bin, where a leading run of empty bins
        # (cdf 0) would otherwise put it at -1.
        quantiles[:, 0] = edges[0, (counts > 0).int().argmax(-1)]
        std = (squares / n - mean.square()).clamp_min(0).sqrt()
        return cls(mean.float(), std.float(), quantiles.float())

    def to_dict(self) -> dict[str, list]:
        """Plain lists, for a JSON or torch file."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "quantiles": self.quantiles.tolist()}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Reference:
        missing = {"mean", "std", "quantiles"} - set(state)
        if missing:
            raise ValueError(f"A Reference dict needs mean, std and quantiles; {sorted(missing)} missing.")
        return cls(*(torch.as_tensor(state[k], dtype=torch.float32) for k in ("mean", "std", "quantiles")))


@dataclass(frozen=True)
class PostProcess:
    """The steps of a chain, by name, applied in order."""

    steps: tuple[tuple[str, Step], ...]

    @property
    def name(self) -> str:
        """The step names joined by "+", e.g. "color+median", to label metrics; "none" for an empty chain."""
        return "+".join(name for name, _ in self.steps) or "none"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """B×3×H×W in [-1, 1] → the same shape, dtype and device, clamped to [-1, 1]."""
        x = _check_images(images).float()
        for _, step in self.steps:
            x = step(x)
        return x.clamp(-1, 1).to(images.dtype)


def build_chain(
    steps: Sequence[str | Mapping[str, Any]], reference: Reference | None = None, key: str = "postprocess"
) -> PostProcess:
    """The chain for a config list such as `[{"name": "color", "method": "histogram"}, "median"]`: each step is
    a mapping with a `name` and its options, or a bare name for the defaults. `reference` is needed by `color`.
    `key` is where the list sits in the config (e.g. "eval.postprocess"), for the error messages."""
    chain = []
    for i, spec in enumerate(steps):
        where = f"{key}[{i}]"
        options = {"name": spec} if isinstance(spec, str) else dict(spec) if isinstance(spec, Mapping) else None
        if options is None:
            raise ValueError(f"{where} is {spec!r}: a step is a name or a mapping with a name and its options.")
        name = options.pop("name", None)
        if name not in _STEPS:
            raise ValueError(f"{where}.name is {name!r}; the steps are {', '.join(map(repr, _STEPS))}.")
        # Colour is the one step that needs the reference; binding the context leaves only the options.
        factory = partial(_STEPS[name], where, reference) if name == "color" else partial(_STEPS[name], where)
        valid = list(inspect.signature(factory).parameters)
        for option in options:
            if option not in valid:
                raise ValueError(f"{where}.{option} is not an option of {name!r}; its options are {', '.join(valid)}.")
        chain.append((name, factory(**options)))
    return PostProcess(tuple(chain))


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected images B×3×H×W, got shape {tuple(images.shape)}.")
    return images


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Batched `numpy.interp`: `x` (..., N) through the piecewise-linear map from `xp` (..., K), non-decreasing,
    to `fp` (..., K), clamped to the end values."""
    i = torch.searchsorted(xp, x).clamp_(1, xp.shape[-1] - 1)
    x0, x1, y0, y1 = xp.gather(-1, i - 1), xp.gather(-1, i), fp.gather(-1, i - 1), fp.gather(-1, i)
    # Empty histogram bins make flat runs of the CDF, so zero-width segments.
    t = ((x - x0) / (x1 - x0).clamp_min(1e-12)).clamp_(0, 1)
    return y0 + t * (y1 - y0)


def _match_mean_std(x: torch.Tensor, reference: Reference) -> torch.Tensor:
    mean, std = x.mean((2, 3), keepdim=True), x.std((2, 3), correction=0, keepdim=True)
    target_mean, target_std = (v.to(x.device).view(1, 3, 1, 1) for v in (reference.mean, reference.std))
    # A flat channel has no spread to rescale: it moves to the reference mean.
    return (x - mean) / std.clamp_min(1e-6) * target_std + target_mean


def _match_histogram(x: torch.Tensor, reference: Reference) -> torch.Tensor:
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    ordered = flat.sort(-1).values
    # Each value's mean rank among its equals: a run of equal values (a saturated or flat region) lands on the
    # middle of its share of the reference rather than on one end of it.
    rank = (torch.searchsorted(ordered, flat) + torch.searchsorted(ordered, flat, right=True) - 1) / 2
    levels = reference.quantiles.shape[-1]
    position = rank * ((levels - 1) / max(h * w - 1, 1))
    low = position.floor().long().clamp_(max=levels - 2)
    quantiles = reference.quantiles.to(x.device).expand(b, c, levels)
    matched = quantiles.gather(-1, low).lerp(quantiles.gather(-1, low + 1), position - low)
    return matched.view(b, c, h, w)


_COLOR_METHODS = {"mean_std": _match_mean_std, "histogram": _match_histogram}


def _color(where: str, reference: Reference | None, method: str = "mean_std") -> Step:
    if reference is None:
        raise ValueError(
            f"{where} (color) needs a reference set: pass build_chain(..., reference=Reference.from_images(batches)) "
            "with the training images, or Reference.from_dict(...) of a cached one."
        )
    if method not in _COLOR_METHODS:
        raise ValueError(f"{where}.method is {method!r}; the methods are {', '.join(map(repr, _COLOR_METHODS))}.")
    return partial(_COLOR_METHODS[method], reference=reference)


def _odd_size(where: str, size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"{where}.size is {size!r}; it must be an odd positive integer (the window is centred).")
    return size


def _positive(where: str, option: str, value: Any, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (value == 0 and not zero):
        raise ValueError(
            f"{where}.{option} is {value!r}; it must be a {'non-negative' if zero else 'positive'} number."
        )
    return float(value)


def _median(where: str, size: int = 3) -> Step:
    return partial(median_blur, kernel_size=_odd_size(where, size))


def _bilateral(where: str, size: int = 5, sigma_color: float = 0.3, sigma_space: float = 1.5) -> Step:
    """`sigma_color` is in [-1, 1] units of kornia's colour distance, the sum of the absolute RGB differences: the
    default weighs down a neighbour that differs by 0.3 in all three channels to exp(-0.9²/0.18) ≈ 1%."""
    space = _positive(where, "sigma_space", sigma_space)
    color = _positive(where, "sigma_color", sigma_color)
    return partial(bilateral_blur, kernel_size=_odd_size(where, size), sigma_color=color, sigma_space=(space, space))


def _sharpen(where: str, amount: float = 0.5, sigma: float = 1.0) -> Step:
    amount, sigma = _positive(where, "amount", amount, zero=True), _positive(where, "sigma", sigma)
    # kornia's unsharp mask has a fixed gain of 1 (2x - blur); `amount` interpolates, or extrapolates past 1.
    size = 2 * math.ceil(3 * sigma) + 1
    return lambda x: x.lerp(unsharp_mask(x, size, (sigma, sigma)), amount)


_STEPS: dict[str, Callable[..., Step]] = {
    "color": _color,
    "median": _median,
    "bilateral": _bilateral,
    "sharpen": _sharpen,
}

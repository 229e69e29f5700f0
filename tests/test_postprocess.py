"""Post-processing steps on synthetic images whose answer is known: colour drift undone against the reference set,
noise variance cut by the filters, edges steepened by sharpening, and the config errors.

Images stay under 32,768 values a tensor: above that torch splits element-wise ops over its thread pool, which
on a busy two-core machine costs milliseconds an op, and kornia's median runs about fifty of them."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from capdiff.postprocess import PostProcess, Reference, build_chain

SIZE = 48
LEVELS = torch.linspace(0, 1, 256)


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")


def scenes(n: int, seed: int = 0) -> torch.Tensor:
    """n×3×SIZE×SIZE images in (-1, 1) without clamping: a per-channel gradient, a soft-edged disc, a sine
    texture and a little grain (which also keeps values distinct)."""
    g = torch.Generator().manual_seed(seed)
    y, x = _grid()
    a = torch.rand(n, 3, 4, 1, 1, generator=g) * 2 - 1
    centre = torch.rand(n, 2, 1, 1, generator=g) - 0.5
    disc = torch.sigmoid((0.45 - ((x - centre[:, :1]) ** 2 + (y - centre[:, 1:]) ** 2).sqrt()) / 0.03)
    images = (
        0.3 * (a[:, :, 0] * x + a[:, :, 1] * y)
        + 0.3 * a[:, :, 2] * disc
        + 0.1 * torch.sin(6 * x + 4 * y + 3 * a[:, :, 3])
    )
    images = images + 0.02 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    assert images.abs().max() < 1
    return images


def drift(images: torch.Tensor) -> torch.Tensor:
    """A generator's colour drift, per channel: a gamma (non-linear), a contrast scale and a cast; stays in (-1, 1)."""
    gamma, scale, cast = (
        torch.tensor(v).view(1, 3, 1, 1) for v in ([1.8, 0.6, 1.0], [0.6, 0.7, 0.8], [0.3, -0.2, 0.15])
    )
    return (2 * ((images + 1) / 2) ** gamma - 1) * scale + cast


def quantile_error(images: torch.Tensor, reference: Reference) -> torch.Tensor:
    """|each image's 256 per-channel quantiles - the reference's|, n×3×256."""
    quantiles = torch.stack([image.reshape(3, -1).quantile(LEVELS, dim=-1).T for image in images])
    return (quantiles - reference.quantiles).abs()


def moment_errors(images: torch.Tensor, reference: Reference) -> tuple[float, float]:
    """The largest per-image, per-channel |mean - the reference's| and |std - the reference's|."""
    mean = (images.mean((2, 3)) - reference.mean).abs().max().item()
    return mean, (images.std((2, 3), correction=0) - reference.std).abs().max().item()


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    return scenes(8)


@pytest.fixture(scope="module")
def reference(clean: torch.Tensor) -> Reference:
    return Reference.from_images([clean[:3], clean[3:]])


def test_mean_std_matches_each_image_to_the_reference_moments(clean: torch.Tensor, reference: Reference) -> None:
    shifted = drift(clean)
    mean_error, std_error = moment_errors(shifted, reference)
    assert mean_error > 0.1 and std_error > 0.05  # measured: 0.19 and 0.13
    mean_error, std_error = moment_errors(
        build_chain([{"name": "color", "method": "mean_std"}], reference)(shifted), reference
    )
    # In [-1, 1] units, per image and channel; measured 4e-8 and 1e-8 (float32 rounding).
    assert mean_error < 0.02 and std_error < 0.02


def test_histogram_matching_undoes_a_nonlinear_drift(clean: torch.Tensor, reference: Reference) -> None:
    shifted = drift(clean)
    assert quantile_error(shifted, reference).max() > 0.3  # measured 0.62
    error = quantile_error(build_chain([{"name": "color", "method": "histogram"}], reference)(shifted), reference)
    # Each image's 256 quantiles against the reference's, per channel, in [-1, 1] units: measured max 0.0004 and
    # mean 1e-5, since an image's quantile levels map onto the reference's own.
    assert error.max() < 0.02 and error.mean() < 0.002
    # A gamma is not a scale and shift: moment matching leaves the distribution's shape off (measured max 0.30).
    assert quantile_error(build_chain(["color"], reference)(shifted), reference).max() > 0.1


@pytest.mark.parametrize("method", ["mean_std", "histogram"])
def test_an_image_matched_to_its_own_statistics_is_unchanged(method: str) -> None:
    image = scenes(1, seed=3)
    out = build_chain([{"name": "color", "method": method}], Reference.from_images([image]))(image)
    # Measured max 6e-8 (mean_std) and 0.018 (histogram: the reference keeps 256 quantiles, and between two of
    # them, 1/255 of the pixels apart, the map is linear, which moves the sparse tails most); mean 0.0004 at most.
    assert (out - image).abs().max() < 0.03 and (out - image).abs().mean() < 0.002


def test_histogram_matching_puts_a_saturated_run_in_the_middle_of_its_share() -> None:
    """A quarter of the pixels at +1 (clipped highlights) against a uniform reference: they land on the middle of
    the top quarter of the reference, 0.75, rather than at one end of it."""
    reference = Reference.from_dict({"mean": [0.0] * 3, "std": [0.5] * 3, "quantiles": [[-1.0, 1.0]] * 3})
    image = torch.linspace(-1, 0.5, 3 * 4 * 16).view(1, 3, 4, 16).clone()
    image[..., 12:] = 1.0
    out = build_chain([{"name": "color", "method": "histogram"}], reference)(image)
    assert out[..., 12:].flatten().tolist() == pytest.approx([0.75] * 3 * 4 * 4, abs=0.02)


def _smooth() -> torch.Tensor:
    y, x = _grid()
    return torch.stack([0.4 * x, 0.3 * y, 0.2 * (x + y) - 0.1]).expand(2, 3, SIZE, SIZE)


def _mse(x: torch.Tensor, clean: torch.Tensor) -> float:
    return (x - clean).square().mean().item()


@pytest.mark.parametrize(("step", "factor"), [("median", 4), ("bilateral", 4)])  # measured 5.7 and 6.5
def test_filters_cut_gaussian_noise(step: str, factor: float) -> None:
    clean = _smooth()
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    assert _mse(build_chain([step])(noisy), clean) < _mse(noisy, clean) / factor


def test_median_removes_salt_and_pepper() -> None:
    clean = _smooth()
    u = torch.rand(clean.shape, generator=torch.Generator().manual_seed(1))
    noisy = clean.masked_fill(u < 0.025, -1.0).masked_fill(u > 0.975, 1.0)
    assert _mse(build_chain(["median"])(noisy), clean) < _mse(noisy, clean) / 100  # measured 430 (bilateral: 1.07)


def test_bilateral_keeps_an_edge_while_smoothing_noise() -> None:
    _, x = _grid()
    step = torch.where(x > 0, 0.6, -0.6).expand(1, 3, SIZE, SIZE)
    noisy = step + 0.1 * torch.randn(step.shape, generator=torch.Generator().manual_seed(2))
    bilateral = build_chain(["bilateral"])
    assert (bilateral(step) - step).abs().max() < 1e-3
    assert _mse(bilateral(noisy), step) < _mse(noisy, step) / 4  # measured 6.6


@pytest.mark.parametrize("step", ["median", {"name": "median", "size": 5}, "bilateral", "sharpen"])
def test_a_flat_image_stays_flat_up_to_the_corners(step: str | dict) -> None:
    """The borders are reflected: zero padding would pull the corners towards grey (kornia < 0.9's median)."""
    flat = torch.full((1, 3, 16, 16), 0.8)
    assert (build_chain([step])(flat) - flat).abs().max() < 1e-6


def _max_gradient(images: torch.Tensor) -> float:
    return images.diff(dim=-1).abs().amax().item()


def test_sharpening_steepens_a_blurred_edge() -> None:
    _, x = _grid()
    edge = 0.5 * torch.tanh(x / 0.1).expand(1, 3, SIZE, SIZE)
    assert _max_gradient(build_chain(["sharpen"])(edge)) > 1.03 * _max_gradient(edge)  # measured 1.07
    stronger = build_chain([{"name": "sharpen", "amount": 1.0, "sigma": 2.0}])(edge)
    assert _max_gradient(stronger) > 1.2 * _max_gradient(edge)  # measured 1.33
    assert torch.equal(build_chain([{"name": "sharpen", "amount": 0}])(edge), edge)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shape_dtype_device_and_range_are_kept(dtype: torch.dtype, reference: Reference) -> None:
    images = scenes(2, seed=4).to(dtype)
    chain = build_chain([{"name": "color", "method": "histogram"}, "median", "bilateral", "sharpen"], reference)
    out = chain(images)
    assert out.shape == images.shape and out.dtype == dtype and out.device == images.device
    assert out.min() >= -1 and out.max() <= 1


def test_an_image_does_not_depend_on_its_batch(reference: Reference) -> None:
    images = scenes(3, seed=6)
    chain = build_chain(
        ["color", {"name": "color", "method": "histogram"}, "median", "bilateral", "sharpen"], reference
    )
    assert torch.allclose(chain(images)[1:2], chain(images[1:2]), atol=1e-6)


def test_output_is_clamped() -> None:
    _, x = _grid()
    step = torch.where(x > 0, 1.0, -1.0).expand(1, 3, SIZE, SIZE)
    out = build_chain([{"name": "sharpen", "amount": 3.0}])(step)  # overshoots past ±1 before the clamp
    assert out.min() == -1 and out.max() == 1


@pytest.mark.gpu
def test_runs_on_cuda(reference: Reference) -> None:
    images = scenes(2, seed=5).cuda().bfloat16()
    out = build_chain(["color", {"name": "color", "method": "histogram"}, "median", "bilateral", "sharpen"], reference)(
        images
    )
    assert out.device == images.device and out.dtype == torch.bfloat16 and out.shape == images.shape


def test_names_label_the_chain(reference: Reference) -> None:
    chain = build_chain(["color", {"name": "median", "size": 5}], reference)
    assert isinstance(chain, PostProcess) and chain.name == "color+median"
    assert build_chain([]).name == "none"


def test_an_omegaconf_list_builds() -> None:
    steps = OmegaConf.create(["median", {"name": "bilateral", "size": 3, "sigma_color": 0.2}])
    assert build_chain(steps).name == "median+bilateral"


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (["median", "blur"], r"eval\.postprocess\[1\]\.name is 'blur'; the steps are 'color', 'median', 'bilateral'"),
        (
            ["median", {"name": "median", "sizee": 3}],
            r"eval\.postprocess\[1\]\.sizee is not an option of 'median'.*size",
        ),
        ([{"size": 3}], r"eval\.postprocess\[0\]\.name is None"),
        ([3], r"eval\.postprocess\[0\] is 3: a step is a name or a mapping"),
        ([{"name": "median", "size": 4}], r"eval\.postprocess\[0\]\.size is 4; it must be an odd positive integer"),
        ([{"name": "sharpen", "sigma": 0}], r"eval\.postprocess\[0\]\.sigma is 0; it must be a positive number"),
        (["sharpen", {"name": "sharpen", "amount": -1}], r"eval\.postprocess\[1\]\.amount is -1; .* non-negative"),
        (["color"], r"eval\.postprocess\[0\] \(color\) needs a reference set: .*Reference\.from_images"),
    ],
)
def test_config_errors_name_the_entry(steps: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_chain(steps, key="eval.postprocess")


def test_an_unknown_color_method_is_named(reference: Reference) -> None:
    with pytest.raises(ValueError, match=r"postprocess\[0\]\.method is 'lab'; the methods are 'mean_std', 'histogram'"):
        build_chain([{"name": "color", "method": "lab"}], reference)


def test_reference_streams_batches_and_matches_the_whole_set(clean: torch.Tensor, reference: Reference) -> None:
    whole = Reference.from_images([clean])
    for a, b in ((reference.mean, whole.mean), (reference.std, whole.std), (reference.quantiles, whole.quantiles)):
        assert torch.allclose(a, b, atol=1e-6)
    pixels = clean.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(reference.mean, pixels.mean(-1), atol=1e-5)
    assert torch.allclose(reference.std, pixels.std(-1, correction=0), atol=1e-5)
    # Quantiles from a 4096-bin histogram: within a bin's width, 2 / 4096, of the exact ones where pixels are dense
    # (median error 3e-5); in the sparse tails the exact ones interpolate across the gap between two neighbouring
    # values, while the histogram puts them in the next value's bin (max 0.0007).
    error = (reference.quantiles - pixels.quantile(LEVELS, dim=-1).T).abs()
    assert error.median() < 2 / 4096 and error.max() < 0.002


def test_reference_takes_uint8_batches() -> None:
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    reference = Reference.from_images(iter([pixels[:1], pixels[1:]]))
    assert torch.allclose(reference.mean, (pixels.float() / 127.5 - 1).mean((0, 2, 3)), atol=1e-5)


def test_reference_round_trips_through_json_and_torch(reference: Reference, tmp_path) -> None:
    path = tmp_path / "reference.pt"
    torch.save(reference.to_dict(), path)
    for state in (json.loads(json.dumps(reference.to_dict())), torch.load(path)):
        restored = Reference.from_dict(state)
        assert torch.equal(restored.mean, reference.mean) and torch.equal(restored.std, reference.std)
        assert torch.equal(restored.quantiles, reference.quantiles)


def test_reference_errors() -> None:
    with pytest.raises(ValueError, match="no images"):
        Reference.from_images([])
    with pytest.raises(ValueError, match=r"\['quantiles'\] missing"):
        Reference.from_dict({"mean": [0.0] * 3, "std": [1.0] * 3})
    with pytest.raises(ValueError, match=r"quantiles \(3, levels\); got \(3,\), \(3,\) and \(256,\)"):
        Reference.from_dict({"mean": [0.0] * 3, "std": [1.0] * 3, "quantiles": [0.0] * 256})
    with pytest.raises(ValueError, match="at least 2 quantile levels"):
        Reference.from_images([torch.zeros(1, 3, 8, 8)], levels=1)
    with pytest.raises(ValueError, match="B×3×H×W"):
        Reference.from_images([torch.zeros(1, 4, 8, 8)])

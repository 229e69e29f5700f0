"""Samplers by name: the diffusers schedulers that sample a model trained on a DDPM noise schedule, each built
from the model's own schedule (`build_scheduler`), and checked by name before any work (`check_sampler`).
`capdiff.sampling.sample` steps whichever one is chosen."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # diffusers is imported when a sampler is resolved: the CLI's --help does not wait for it
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

# Short names, as samplers are known in the image-generation tools, for the schedulers diffusers builds from a DDPM
# noise schedule, with the settings that make each the named method. "ancestral"/"sde" ones add fresh noise at
# every step (stochastic); the rest solve the probability-flow ODE (deterministic; DDIM also with `eta` > 0).
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_2s": (
        "DPMSolverSinglestepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True},
    ),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
STOCHASTIC = ("ddpm", "euler_a", "dpm2_a", "dpmpp_2m_sde")
# What capdiff samples with unless told otherwise: grids, periodic evaluation, evaluate.py, Pipeline, the CLI and
# the demo. DPM-Solver++ (2M) at 15 steps matched DDIM at 50 steps in bench/samplers.py at 2.9× the images/s
# (docs/benchmarks.md, §10, which says why not the 5 steps that also matched there).
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_STEPS = 15
# EDM's Euler takes its own σ parametrization, not a DDPM schedule's betas.
_NOT_DDPM = ("EDMEulerScheduler",)


def sampler_names() -> list[str]:
    """Every name `sampler=` takes: the short names, then the diffusers scheduler classes themselves."""
    from diffusers import DDPMScheduler

    classes = sorted(name for name in DDPMScheduler._compatibles if name not in _NOT_DDPM)
    return [*SAMPLERS, *classes]


def resolve_sampler(name: str, key: str = "sampler") -> tuple[type[SchedulerMixin], dict]:
    """The scheduler class and settings of sampler `name`; a ValueError naming `key` and the valid names for
    anything else. Cheap (builds nothing): configs are checked with it before any work."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{key}={name!r}: name a sampler, one of {', '.join(sampler_names())}.")
    class_name, settings = SAMPLERS.get(name, (name, {}))
    if class_name not in sampler_names()[len(SAMPLERS) :]:
        raise ValueError(f"{key}={name!r} is not a sampler; use one of {', '.join(sampler_names())}.")
    import diffusers

    try:
        cls = getattr(diffusers, class_name)
        inspect.signature(cls.__init__)  # a class whose optional dependency is missing raises here
    except ImportError as err:
        raise ValueError(f"{key}={name!r}: {str(err).strip()}") from None
    return cls, settings


def check_sampler(name: str, key: str = "sampler", zero_terminal_snr: bool = False) -> str:
    """`name` if it is a sampler (see `resolve_sampler`) that can sample a model trained with `zero_terminal_snr`."""
    cls, _ = resolve_sampler(name, key)
    if zero_terminal_snr and not _follows_zero_snr(cls):
        raise ValueError(
            f"{key}={name!r} cannot sample a model trained with zero terminal SNR (model.diffusion.zero_terminal_snr): "
            f"its scheduler has no rescale_betas_zero_snr. Use one of {', '.join(usable_samplers(True))}."
        )
    return name


def usable_samplers(zero_terminal_snr: bool) -> list[str]:
    """The short names that can sample a model trained with (or without) zero terminal SNR."""
    return [n for n in SAMPLERS if not zero_terminal_snr or _follows_zero_snr(resolve_sampler(n)[0])]


def is_ddim(name: str | None) -> bool:
    """Whether `name` is DDIM, the sampler inversion editing regenerates with."""
    return name in ("ddim", "DDIMScheduler")


def build_scheduler(training: Mapping, name: str = DEFAULT_SAMPLER, key: str = "sampler") -> SchedulerMixin:
    """Sampler `name` built from the training scheduler's config `training`: its betas, prediction type (ε or v),
    zero terminal SNR and timestep spacing, with no sample clipping and SD's step offset. A scheduler that cannot
    follow the model's schedule (zero terminal SNR) is refused, naming the ones that can."""
    check_sampler(name, key, bool(training.get("rescale_betas_zero_snr")))
    cls, settings = resolve_sampler(name, key)
    accepted = inspect.signature(cls.__init__).parameters
    wanted = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, **settings}
    return cls.from_config(training, **{k: v for k, v in wanted.items() if k in accepted})


def _follows_zero_snr(cls: type) -> bool:
    """Whether the scheduler class can rescale its betas to zero terminal SNR."""
    return "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters

"""The rectified-flow Euler sampler of TRELLIS and NeAR, with classifier-free guidance on an interval, for any model.

Facts from TRELLIS `trellis/pipelines/samplers/flow_euler.py` and `guidance_interval_mixin.py` (commit 6b0d647;
NeAR's copies at 163c214 are byte-identical):

* The flow runs from noise at t = 1 to data at t = 0: x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps. The
  model predicts the velocity v = (1 - sigma_min) eps - x0 (it is fed 1000 t; that scaling belongs to the model's
  adapter, `lift.official`, not to this module).
* Time grid: t_i = linspace(1, 0, S + 1) (numpy, float64), warped by t' = r t / (1 + (r - 1) t) with r = rescale_t
  (r > 1 spends more of the steps near the noise end).
* Step: x <- x - (t_i - t_{i+1}) v(x, t_i). The sample is x after the last step (t = 0).
* Guidance: v = (1 + w) v(x, t, cond) - w v(x, t, neg_cond) when cfg_interval[0] <= t <= cfg_interval[1] (the warped
  t, both ends included); outside, one evaluation v(x, t, cond). `FlowEulerCfgSampler` is the interval [0, 1];
  `FlowEulerSampler` has no guidance (w = 0).
* sigma_min enters only TRELLIS's per-step estimate x0 = (1 - sigma_min) x_t - (sigma_min + (1 - sigma_min) t) v,
  which it records for display; the sample itself never uses it. It is therefore read and checked, and not used.

`slat_normalization` ({mean, std}, one value per latent channel) undoes the training normalisation of the latent:
latent = sample * std + mean (`LatentNormalization`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = [
    "LatentNormalization",
    "SAMPLER_NAMES",
    "SamplerSettings",
    "Velocity",
    "flow_timesteps",
    "guided_velocity",
    "sample_flow",
]

#: velocity(x, t, cond) -> v, same shape as x; t is the flow time in [0, 1]; cond is whatever the model takes.
Velocity = Callable[[torch.Tensor, float, Any], torch.Tensor]

#: The official sampler classes, all one Euler sampler that differ only in where guidance applies.
SAMPLER_NAMES = ("FlowEulerSampler", "FlowEulerCfgSampler", "FlowEulerGuidanceIntervalSampler")
_PARAMS = ("steps", "cfg_strength", "cfg_interval", "rescale_t")
MAX_STEPS = 1000


@dataclass(frozen=True)
class SamplerSettings:
    """The official sampler's `params`: Euler `steps`, guidance strength w, the t interval where it applies, and the
    time warp r (`rescale_t`). A pipeline file's missing params take the defaults of TRELLIS's `sample()`: 50 steps,
    w = 3 (none for `FlowEulerSampler`), interval [0, 1], r = 1."""

    steps: int
    cfg_strength: float = 0.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    rescale_t: float = 1.0

    def __post_init__(self) -> None:
        problem = _problem(vars(self))
        if problem:
            raise ValueError(f"sampler settings: {problem}")

    @classmethod
    def from_official(cls, entry: Any, where: str) -> SamplerSettings:
        """Settings from a pipeline file's `{"name": ..., "args": {"sigma_min": ...}, "params": {...}}`; anything
        unknown or out of range is a CheckpointError naming `where` (the file and key)."""
        if not isinstance(entry, Mapping) or entry.get("name") not in SAMPLER_NAMES:
            name = entry.get("name") if isinstance(entry, Mapping) else entry
            raise CheckpointError(f"{where}: the sampler must be one of {', '.join(SAMPLER_NAMES)}, got {name!r}")
        args = entry.get("args") or {}
        if not isinstance(args, Mapping) or set(args) - {"sigma_min"}:
            raise CheckpointError(f"{where}: sampler args may only hold sigma_min, got {args!r}")
        sigma_min = args.get("sigma_min", 0.0)
        if not _real(sigma_min) or not 0 <= sigma_min < 1:
            raise CheckpointError(f"{where}: sigma_min must be a number in [0, 1), got {sigma_min!r}")
        params = entry.get("params", {})
        if not isinstance(params, Mapping):
            raise CheckpointError(f"{where}: the sampler's params must be a table, got {params!r}")
        name = entry["name"]
        refused = sorted({"FlowEulerSampler": {"cfg_strength", "cfg_interval"},
                          "FlowEulerCfgSampler": {"cfg_interval"}}.get(name, set()) & set(params))
        if refused:  # TRELLIS would hand them to the model and fail
            raise CheckpointError(f"{where}: {name} takes no {' or '.join(refused)}")
        defaults = {"steps": 50, "cfg_strength": 0.0 if name == "FlowEulerSampler" else 3.0}  # TRELLIS's sample()
        return _settings({**defaults, **params}, {}, f"{where}:", CheckpointError)

    def updated(self, params: Mapping[str, Any] | None) -> SamplerSettings:
        """These settings with some `params` replaced (as TRELLIS's `sampler_params` override the pipeline's); a bad
        value is a ValueError."""
        return _settings(params, vars(self), "sampler parameters:", ValueError) if params else self


def _settings(params: Mapping[str, Any], base: Mapping[str, Any], where: str,
              error: type[Exception]) -> SamplerSettings:
    """`base` updated with `params`, checked: unknown names and bad values raise `error` with `where` in front."""
    unknown = sorted(map(str, set(params) - set(_PARAMS)))
    if unknown:
        raise error(f"{where} unknown sampler parameter(s) {', '.join(unknown)}; known: {', '.join(_PARAMS)}")
    fields = {**base, **params}
    interval = fields.get("cfg_interval", (0.0, 1.0))
    if not isinstance(interval, (list, tuple)) or len(interval) != 2:
        raise error(f"{where} cfg_interval must be two numbers [low, high], got {interval!r}")
    fields["cfg_interval"] = tuple(interval)
    problem = _problem({"cfg_strength": 0.0, "rescale_t": 1.0, **fields})
    if problem:
        raise error(f"{where} {problem}")
    return SamplerSettings(**fields)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _problem(fields: Mapping[str, Any]) -> str | None:
    """What is wrong with sampler settings {steps, cfg_strength, cfg_interval, rescale_t}, or None."""
    steps, strength, interval, rescale = (fields["steps"], fields["cfg_strength"], fields["cfg_interval"],
                                          fields["rescale_t"])
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        return f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}"
    if not _real(strength) or not 0 <= strength <= 100:
        return f"cfg_strength must be a number from 0 to 100, got {strength!r}"
    if (not isinstance(interval, tuple) or len(interval) != 2 or not all(_real(v) for v in interval)
            or not 0 <= interval[0] <= interval[1] <= 1):
        return f"cfg_interval must be [low, high] with 0 <= low <= high <= 1, got {interval!r}"
    if not _real(rescale) or not 0 < rescale <= 1000:
        return f"rescale_t must be a number in (0, 1000], got {rescale!r}"
    return None


def flow_timesteps(steps: int, rescale_t: float = 1.0) -> list[float]:
    """The S + 1 times from 1 to 0: linspace(1, 0, S + 1) warped by t' = r t / (1 + (r - 1) t), in float64."""
    t = np.linspace(1.0, 0.0, steps + 1)
    return (rescale_t * t / (1 + (rescale_t - 1) * t)).tolist()


def guided_velocity(velocity: Velocity, x: torch.Tensor, t: float, cond: Any, neg_cond: Any, cfg_strength: float,
                    cfg_interval: tuple[float, float]) -> torch.Tensor:
    """(1 + w) v(x, t, cond) - w v(x, t, neg_cond) inside `cfg_interval` (ends included), else v(x, t, cond) alone."""
    if cfg_strength and cfg_interval[0] <= t <= cfg_interval[1]:
        return (1 + cfg_strength) * velocity(x, t, cond) - cfg_strength * velocity(x, t, neg_cond)
    return velocity(x, t, cond)


def sample_flow(velocity: Velocity, noise: torch.Tensor, cond: Any, neg_cond: Any, settings: SamplerSettings,
                on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate the flow from `noise` (t = 1) to t = 0 with `settings.steps` Euler steps; the sample, like `noise`.

    `on_step(done, steps)` runs after every step (progress; it may raise to stop the sampling). A zero guidance
    strength never evaluates the model on `neg_cond`, as TRELLIS's `FlowEulerSampler`. Runs under `torch.no_grad`.
    """
    times = flow_timesteps(settings.steps, settings.rescale_t)
    x = noise
    with torch.no_grad():
        for i in range(settings.steps):
            t, t_next = times[i], times[i + 1]
            v = guided_velocity(velocity, x, t, cond, neg_cond, settings.cfg_strength, settings.cfg_interval)
            x = x - (t - t_next) * v
            if on_step is not None:
                on_step(i + 1, settings.steps)
    return x


@dataclass(frozen=True)
class LatentNormalization:
    """The latent's per-channel training normalisation: `mean`, `std` float32 [C]; `denormalize` undoes it."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_official(cls, entry: Any, channels: int, where: str) -> LatentNormalization:
        """From a pipeline file's `slat_normalization` {mean: [C numbers], std: [C positive numbers]}."""
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"{where}: slat_normalization must be {{mean: [...], std: [...]}}, got {entry!r}")
        values = {}
        for name in ("mean", "std"):
            v = entry.get(name)
            if not isinstance(v, list) or len(v) != channels or not all(_real(x) for x in v):
                raise CheckpointError(f"{where}: slat_normalization {name} must be a list of {channels} numbers (one "
                                      f"per latent channel), got {v!r}")
            values[name] = torch.tensor(v, dtype=torch.float32)
        if bool((values["std"] <= 0).any()):
            raise CheckpointError(f"{where}: slat_normalization std must be positive, got {entry['std']!r}")
        return cls(values["mean"], values["std"])

    def denormalize(self, sample: torch.Tensor) -> torch.Tensor:
        """sample [N, C] (the flow's output) -> the latent the decoders read: sample * std + mean."""
        return sample * self.std.to(sample) + self.mean.to(sample)

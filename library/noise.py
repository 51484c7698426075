"""Noise, timesteps and the loss of one training step, as pure functions on tensors.

Every random draw comes from an explicit ``torch.Generator`` (the recipe keeps one and saves its
state with the training state, so a resumed run draws exactly the same noise). The formulas follow
kohya's sd-scripts so a kohya command line trains the same way:

- DDPM "scaled linear" betas from 0.00085 to 0.012 over 1000 steps (SD/SDXL's training schedule),
  optionally rescaled to zero terminal SNR (Lin et al. 2023, ``--zero_terminal_snr``).
- noise = N(0, 1), plus ``--noise_offset`` (a random constant per image and channel, optionally
  scaled by ``--noise_offset_random_strength`` and ``--adaptive_noise_scale``), plus multi-resolution
  "pyramid" noise (``--multires_noise_iterations``/``--multires_noise_discount``).
- ``--ip_noise_gamma``: input perturbation, extra noise in x_t only (the target stays the same).
- loss l2/l1/huber/smooth_l1 (``--huber_c``, ``--huber_schedule``), averaged per image, weighted per
  image by min-SNR-gamma, v-pred-like scaling and debiased estimation, then averaged over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
SNR_CAP = 1000.0  # kohya caps SNR at 1000 where it would be infinite (t = 0)
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


@dataclass(frozen=True)
class NoiseOptions:
    """The noise and loss flags (kohya's names and defaults)."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    huber_schedule: str = "snr"
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    debiased_estimation_loss: bool = False
    v_parameterization: bool = False
    zero_terminal_snr: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "NoiseOptions":
        """Pick the fields of this class from any object with those attributes (``TrainConfig``)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)})


def ddpm_betas(
    num_steps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> torch.Tensor:
    """The "scaled linear" schedule: betas linear in sqrt space (float32, as diffusers' DDPMScheduler)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has SNR exactly 0 and the first keeps its SNR.

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged;
    betas are then recovered from the ratios of consecutive alpha_bars.
    """
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule plus the noise/loss options that go with it."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    options: NoiseOptions

    @classmethod
    def from_options(cls, options: NoiseOptions | None = None) -> "NoiseSchedule":
        options = options or NoiseOptions()
        betas = ddpm_betas()
        if options.zero_terminal_snr:
            betas = zero_terminal_snr(betas)
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0), options=options)

    @classmethod
    def from_config(cls, cfg: Any) -> "NoiseSchedule":
        return cls.from_options(NoiseOptions.from_config(cfg))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def gather(self, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_bar at each timestep, float32, on the timesteps' device."""
        return self.alphas_cumprod[timesteps.cpu().long()].to(timesteps.device)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep (inf where alpha_bar = 1)."""
        alpha_bar = self.gather(timesteps)
        return alpha_bar / (1.0 - alpha_bar)


# ----------------------------------------------------------------------------------------- noise


def sample_timesteps(batch: int, options: NoiseOptions, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep) (defaults 0 and 1000), on the CPU."""
    low = 0 if options.min_timestep is None else options.min_timestep
    high = NUM_TRAIN_TIMESTEPS if options.max_timestep is None else options.max_timestep
    return torch.randint(low, high, (batch,), generator=generator)


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def offset_noise(
    noise: torch.Tensor,
    latents: torch.Tensor,
    generator: torch.Generator,
    offset: float | torch.Tensor,
    adaptive_noise_scale: float | None = None,
) -> torch.Tensor:
    """Add ``offset * N(0, 1)`` per image and channel (constant over height and width).

    With ``adaptive_noise_scale`` the offset grows with each channel's mean |latent|:
    ``max(0, offset + adaptive_noise_scale * |mean(latents)|)``.
    """
    offset = torch.as_tensor(offset, dtype=noise.dtype, device=noise.device)
    if adaptive_noise_scale is not None:
        channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs().to(noise.dtype)
        offset = torch.clamp(offset + adaptive_noise_scale * channel_mean, min=0.0)
    return noise + offset * _randn((latents.shape[0], latents.shape[1], 1, 1), generator, noise)


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise: upsampled noise at shrinking sizes (random factor 2-4 per level),
    weighted ``discount ** level``, added to ``noise``; the sum is scaled back to unit std."""
    batch, channels, height, width = noise.shape
    out = noise.clone()
    for level in range(iterations):
        factor = float(torch.rand(1, generator=generator)) * 2 + 2
        h, w = max(1, int(height / factor**level)), max(1, int(width / factor**level))
        small = _randn((batch, channels, h, w), generator, noise)
        out = out + F.interpolate(small, size=(height, width), mode="bilinear") * discount**level
        if h == 1 or w == 1:
            break
    return out / out.std()


def make_noise(latents: torch.Tensor, generator: torch.Generator, options: NoiseOptions) -> torch.Tensor:
    """The noise to add to ``latents`` (and the epsilon target): N(0, 1), then noise offset, then
    multi-resolution noise, as kohya applies them."""
    noise = _randn(latents.shape, generator, latents)
    if options.noise_offset:
        offset: float | torch.Tensor = options.noise_offset
        if options.noise_offset_random_strength:
            offset = torch.rand(1, generator=generator).to(noise) * options.noise_offset
        noise = offset_noise(noise, latents, generator, offset, options.adaptive_noise_scale)
    if options.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, options.multires_noise_iterations, options.multires_noise_discount)
    return noise


def perturb_noise(noise: torch.Tensor, options: NoiseOptions, generator: torch.Generator) -> torch.Tensor:
    """Input perturbation (``--ip_noise_gamma``): the noise put into x_t, not the target."""
    if not options.ip_noise_gamma:
        return noise
    strength: float | torch.Tensor = options.ip_noise_gamma
    if options.ip_noise_gamma_random_strength:
        strength = torch.rand(1, generator=generator).to(noise) * options.ip_noise_gamma
    return noise + strength * _randn(noise.shape, generator, noise)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def add_noise(schedule: NoiseSchedule, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise (as DDPMScheduler.add_noise)."""
    alpha_bar = _per_image(schedule.gather(timesteps.to(latents.device)), latents)
    return alpha_bar**0.5 * latents + (1 - alpha_bar) ** 0.5 * noise


def v_target(schedule: NoiseSchedule, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The v-prediction target sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x_0."""
    alpha_bar = _per_image(schedule.gather(timesteps.to(latents.device)), latents)
    return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * latents


# ------------------------------------------------------------------------------------------ loss


def huber_threshold(timesteps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor | None:
    """kohya's per-image huber_c for ``huber``/``smooth_l1`` (None for l1/l2).

    constant: ``huber_c * huber_scale``; exponential: ``exp(-alpha t) * huber_scale`` with
    ``alpha = -ln(huber_c) / 1000`` (1 at t = 0 down to huber_c at t = 1000); snr:
    ``(1 - huber_c) / (1 + sigma_t)^2 + huber_c`` with ``sigma_t = sqrt((1 - alpha_bar) / alpha_bar)``.
    """
    opts = schedule.options
    if opts.loss_type not in ("huber", "smooth_l1"):
        return None
    if opts.huber_schedule == "constant":
        return torch.full(timesteps.shape, opts.huber_c * opts.huber_scale, device=timesteps.device)
    if opts.huber_schedule == "exponential":
        alpha = -math.log(opts.huber_c) / schedule.num_train_timesteps
        return torch.exp(-alpha * timesteps.float()) * opts.huber_scale
    if opts.huber_schedule == "snr":
        alpha_bar = schedule.gather(timesteps)
        sigma = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
        return (1 - opts.huber_c) / (1 + sigma) ** 2 + opts.huber_c
    raise ValueError(f"unknown huber_schedule {opts.huber_schedule!r}; expected one of {HUBER_SCHEDULES}")


def element_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Loss per element (no reduction). huber: ``2c (sqrt(d^2 + c^2) - c)``; smooth_l1:
    ``2 (sqrt(d^2 + c^2) - c)``, c per image."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs huber_c")
        c = _per_image(huber_c.to(pred.device), pred)
        soft = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * soft if loss_type == "huber" else 2 * soft
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): ``min(snr, gamma) / snr`` for epsilon targets,
    ``min(snr, gamma) / (snr + 1)`` for v targets. SNR 0 (zero terminal SNR) gives weight 1 / 0."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if v_prediction:
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))


def v_pred_like_noise_scale(snr: torch.Tensor) -> torch.Tensor:
    """``--scale_v_pred_loss_like_noise_pred``: ``snr / (snr + 1)`` with snr capped at 1000."""
    snr = torch.minimum(snr, torch.full_like(snr, SNR_CAP))
    return snr / (snr + 1)


def debiased_weight(snr: torch.Tensor, v_prediction: bool = False) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024): ``1 / sqrt(snr)``, or ``1 / (snr + 1)`` for v targets,
    snr capped at 1000 (t = 0). SNR 0 (zero terminal SNR) is floored at 1e-3 to stay finite."""
    snr = snr.clamp(min=1e-3, max=SNR_CAP)
    return 1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr)


def loss_weights(timesteps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """The per-image weight: product of the enabled weightings (ones when none is)."""
    opts = schedule.options
    snr = schedule.snr(timesteps).float()
    weight = torch.ones_like(snr)
    if opts.min_snr_gamma:
        weight = weight * min_snr_weight(snr, opts.min_snr_gamma, opts.v_parameterization)
    if opts.scale_v_pred_loss_like_noise_pred:
        weight = weight * v_pred_like_noise_scale(snr)
    if opts.debiased_estimation_loss:
        weight = weight * debiased_weight(snr, opts.v_parameterization)
    return weight


def compute_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar training loss: element loss averaged per image, times the per-image weight,
    averaged over the batch (equal to kohya's plain mean when no weighting is on). ``mask`` (B, h, w)
    in [0, 1] (``alpha_mask``) multiplies each element's loss first, as kohya does: transparent areas
    teach nothing, and the mean still runs over every element."""
    opts = schedule.options
    per_element = element_loss(pred, target, opts.loss_type, huber_threshold(timesteps, schedule))
    if mask is not None:
        mask = mask.to(per_element)[:, None]
        if mask.shape[-2:] != per_element.shape[-2:]:  # a VAE with another scale factor than 8
            mask = F.interpolate(mask, size=per_element.shape[-2:], mode="area")
        per_element = per_element * mask
    per_image = per_element.mean(dim=tuple(range(1, per_element.dim())))
    return (per_image * loss_weights(timesteps, schedule).to(per_image)).mean()

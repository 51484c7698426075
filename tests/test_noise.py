"""library/noise.py against hand-computed values and diffusers' DDPMScheduler."""

from __future__ import annotations

import math

import pytest
import torch

from library import noise as N


def _schedule(**options) -> N.NoiseSchedule:
    return N.NoiseSchedule.from_options(N.NoiseOptions(**options))


def _alpha_bar64(t: int) -> float:
    """alpha_bar_t by hand in float64: betas linear in sqrt space from 0.00085 to 0.012."""
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    prod = 1.0
    for i in range(t + 1):
        beta = (lo + (hi - lo) * i / 999) ** 2
        prod *= 1 - beta
    return prod


def test_betas_and_alpha_bar_match_hand_computation_and_diffusers():
    from diffusers import DDPMScheduler

    schedule = _schedule()
    assert schedule.num_train_timesteps == 1000
    assert schedule.betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert schedule.betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    assert schedule.alphas_cumprod[499].item() == pytest.approx(_alpha_bar64(499), rel=1e-4)
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod)

    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(N.add_noise(schedule, latents, noise, t), reference.add_noise(latents, noise, t), atol=1e-6)
    assert torch.allclose(N.v_target(schedule, latents, noise, t), reference.get_velocity(latents, noise, t), atol=1e-6)


def test_zero_terminal_snr_ends_at_zero_and_keeps_the_first_step():
    plain, zero = _schedule(), _schedule(zero_terminal_snr=True)
    assert zero.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert zero.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-5)
    assert zero.snr(torch.tensor([999])).item() == 0.0
    assert bool((zero.alphas_cumprod[1:] <= zero.alphas_cumprod[:-1]).all())


def test_min_snr_weight_at_a_known_timestep():
    schedule = _schedule(min_snr_gamma=5.0)
    ab = _alpha_bar64(499)
    snr = ab / (1 - ab)  # about 0.277 at t = 499: below gamma, so the epsilon weight is 1
    t = torch.tensor([499, 10])
    snr_t = schedule.snr(t)
    assert snr_t[0].item() == pytest.approx(snr, rel=1e-4)
    eps = N.min_snr_weight(snr_t, 5.0)
    assert eps[0].item() == pytest.approx(1.0)
    ab10 = _alpha_bar64(10)
    snr10 = ab10 / (1 - ab10)  # large at t = 10: weight gamma / snr
    assert eps[1].item() == pytest.approx(5.0 / snr10, rel=1e-4)
    v = N.min_snr_weight(snr_t, 5.0, v_prediction=True)
    assert v[0].item() == pytest.approx(snr / (snr + 1), rel=1e-4)
    assert v[1].item() == pytest.approx(5.0 / (snr10 + 1), rel=1e-4)
    assert N.min_snr_weight(torch.tensor([0.0]), 5.0).item() == 1.0  # zero terminal SNR stays finite


def test_debiased_and_v_pred_scaling_weights():
    snr = torch.tensor([4.0, 1e9])
    assert N.debiased_weight(snr).tolist() == pytest.approx([0.5, 1 / math.sqrt(1000)])
    assert N.debiased_weight(snr, v_prediction=True).tolist() == pytest.approx([0.2, 1 / 1001])
    assert N.v_pred_like_noise_scale(snr).tolist() == pytest.approx([0.8, 1000 / 1001])


def test_noise_offset_adds_the_expected_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    options = N.NoiseOptions(noise_offset=0.1)
    noise = N.make_noise(latents, torch.Generator().manual_seed(7), options)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 4, 8, 8, generator=g)
    offset = 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    assert torch.allclose(noise, base + offset)
    diff = noise - base
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)  # constant over height and width

    adaptive = N.NoiseOptions(noise_offset=0.1, adaptive_noise_scale=0.5)
    shifted = torch.full((2, 4, 8, 8), -0.4)  # |channel mean| 0.4: offset 0.1 + 0.5 * 0.4 = 0.3
    noise = N.make_noise(shifted, torch.Generator().manual_seed(7), adaptive)
    assert torch.allclose(noise - base, 3 * offset, atol=1e-6)


def test_noise_is_reproducible_from_the_generator_and_multires_has_unit_std():
    latents = torch.zeros(2, 4, 32, 32)
    options = N.NoiseOptions(noise_offset=0.05, noise_offset_random_strength=True, multires_noise_iterations=6,
                             multires_noise_discount=0.3)  # fmt: skip
    a = N.make_noise(latents, torch.Generator().manual_seed(3), options)
    b = N.make_noise(latents, torch.Generator().manual_seed(3), options)
    c = N.make_noise(latents, torch.Generator().manual_seed(4), options)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std().item() == pytest.approx(1.0, abs=1e-5)


def test_ip_noise_gamma_perturbs_only_the_input():
    noise = torch.zeros(1, 4, 4, 4)
    assert N.perturb_noise(noise, N.NoiseOptions(), torch.Generator()) is noise
    out = N.perturb_noise(noise, N.NoiseOptions(ip_noise_gamma=0.1), torch.Generator().manual_seed(1))
    assert torch.allclose(out, 0.1 * torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)))


def test_timesteps_stay_in_range():
    t = N.sample_timesteps(4000, N.NoiseOptions(min_timestep=100, max_timestep=200), torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) == 100 and int(t.max()) == 199
    assert int(N.sample_timesteps(500, N.NoiseOptions(), torch.Generator()).max()) < 1000


def test_huber_formula_and_schedules():
    pred, target = torch.tensor([[[[3.0]]]]), torch.tensor([[[[0.0]]]])
    c = torch.tensor([0.5])
    huber = N.element_loss(pred, target, "huber", c).item()
    assert huber == pytest.approx(2 * 0.5 * (math.sqrt(9 + 0.25) - 0.5))
    assert N.element_loss(pred, target, "smooth_l1", c).item() == pytest.approx(2 * (math.sqrt(9.25) - 0.5))
    assert N.element_loss(pred, target, "l1").item() == 3.0 and N.element_loss(pred, target, "l2").item() == 9.0

    t = torch.tensor([0, 500, 1000 - 1])
    const = N.huber_threshold(t, _schedule(loss_type="huber", huber_schedule="constant", huber_c=0.2, huber_scale=2.0))
    assert const.tolist() == pytest.approx([0.4, 0.4, 0.4])
    expo = N.huber_threshold(t, _schedule(loss_type="huber", huber_schedule="exponential", huber_c=0.1))
    assert expo.tolist() == pytest.approx([1.0, 0.1**0.5, 0.1 ** (999 / 1000)], rel=1e-5)
    snr = N.huber_threshold(t[1:2], _schedule(loss_type="smooth_l1", huber_schedule="snr", huber_c=0.1))
    ab = _alpha_bar64(500)
    sigma = math.sqrt((1 - ab) / ab)
    assert snr.item() == pytest.approx(0.9 / (1 + sigma) ** 2 + 0.1, rel=1e-4)
    assert N.huber_threshold(t, _schedule()) is None  # l2 needs none


def test_compute_loss_combines_per_image_loss_and_weights():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([10, 900])
    plain = N.compute_loss(pred, target, t, _schedule())
    assert plain.dim() == 0
    assert plain.item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item(), rel=1e-6)
    schedule = _schedule(min_snr_gamma=5.0, debiased_estimation_loss=True)
    snr = schedule.snr(t)
    weights = N.min_snr_weight(snr, 5.0) * N.debiased_weight(snr)
    per_image = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert N.compute_loss(pred, target, t, schedule).item() == pytest.approx((per_image * weights).mean().item(), rel=1e-6)


def test_noise_schedule_from_a_config_object():
    class Cfg:
        min_snr_gamma = 5.0
        zero_terminal_snr = True
        loss_type = "huber"
        unrelated = "ignored"

    schedule = N.NoiseSchedule.from_config(Cfg())
    assert schedule.options.min_snr_gamma == 5.0 and schedule.options.loss_type == "huber"
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)


def test_alpha_mask_multiplies_each_element_loss_before_the_mean():
    from library.noise import NoiseSchedule, compute_loss

    class Cfg:
        pass

    schedule = NoiseSchedule.from_config(Cfg())
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 6, 4, generator=g), torch.randn(2, 4, 6, 4, generator=g)
    mask = torch.rand(2, 6, 4, generator=g)
    t = torch.tensor([10, 900])
    expected = ((pred - target) ** 2 * mask[:, None]).mean()
    torch.testing.assert_close(compute_loss(pred, target, t, schedule, mask), expected)
    assert compute_loss(pred, target, t, schedule, torch.zeros(2, 6, 4)) == 0
    torch.testing.assert_close(compute_loss(pred, target, t, schedule, torch.ones(2, 6, 4)),
                               compute_loss(pred, target, t, schedule))  # fmt: skip
    # a mask on another grid is averaged onto the loss's own
    fine = mask.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    torch.testing.assert_close(compute_loss(pred, target, t, schedule, fine), expected)

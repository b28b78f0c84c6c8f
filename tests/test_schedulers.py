"""Schedulers: closed-form checks and step-by-step parity with diffusers' DDIM/DDPM schedulers (the oracle)."""
from __future__ import annotations

import math
import types

import pytest
import torch
from conftest import assert_parity
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from t2vz.sd.schedulers import DDIM, DDPM, draw_noise, scaled_linear_alphas_cumprod

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)


def ref_ddim(n: int) -> DDIMScheduler:
    s = DDIMScheduler(**SD15, set_alpha_to_one=False, timestep_spacing="leading")
    s.set_timesteps(n)
    return s


def ref_ddpm(**overrides) -> DDPMScheduler:
    return DDPMScheduler(**{**SD15, "variance_type": "fixed_small", **overrides})


def fake_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """A stand-in ε-model: linear in x plus a fixed pattern that changes with t."""
    pattern = torch.linspace(-1, 1, x.numel(), dtype=torch.float32).reshape(x.shape).to(x.dtype)
    return 0.1 * x + torch.sin(3 * pattern + t / 100)


# --- schedule and timesteps ----------------------------------------------------------------------------------


def test_schedule_bitwise_equal_to_diffusers():
    betas, alphas, alphas_cumprod = scaled_linear_alphas_cumprod()
    ref = ref_ddim(50)
    assert alphas_cumprod.dtype == torch.float32 and alphas_cumprod.shape == (1000,)
    assert torch.equal(betas, ref.betas) and torch.equal(alphas, ref.alphas)
    assert torch.equal(alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(DDIM(50).alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(DDPM().alphas_cumprod, ref_ddpm().alphas_cumprod)


@pytest.mark.parametrize("n", [50, 25, 10, 7, 1, 999])
def test_ddim_timesteps_equal_diffusers(n):
    ours = DDIM(n)
    assert ours.timesteps.dtype == torch.int64
    assert ours.timesteps.tolist() == ref_ddim(n).timesteps.tolist()
    if n == 50:
        assert ours.timesteps[0] == 981 and ours.timesteps[-1] == 1 and len(ours.timesteps) == 50


def test_ddim_final_step_uses_alpha_bar_0():
    ddim = DDIM(50)
    assert ddim.prev_timestep(1) == -19 and ddim.prev_timestep(torch.tensor(981)) == 961
    assert ddim.alpha_bar(-19) == ddim.alphas_cumprod[0]  # set_alpha_to_one=False
    assert ddim.alpha_bar(981).ndim == 0 and ddim.alpha_bar(981).dtype == torch.float32


@pytest.mark.parametrize("n", [50, 25, 7])
@pytest.mark.parametrize("offset", [0, 1])
def test_ddpm_timesteps_for_equal_diffusers(n, offset):
    ref = ref_ddpm(steps_offset=offset)
    ref.set_timesteps(n)
    assert DDPM(steps_offset=offset).timesteps_for(n).tolist() == ref.timesteps.tolist()


# --- DDIM trajectories ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [50, 25, 10])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_trajectory_matches_diffusers(n, eta):
    ours, ref = DDIM(n, eta=eta), ref_ddim(n)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x, x_ref = x_T.clone(), x_T.clone()
    for t in ours.timesteps:
        x, x0 = ours.step(fake_eps(x, int(t)), t, x, generator=g_ours)
        out = ref.step(fake_eps(x_ref, int(t)), t, x_ref, eta=eta, generator=g_ref)
        x_ref = out.prev_sample
        assert_parity(x, x_ref)
        assert_parity(x0, out.pred_original_sample)
    # the noise streams stayed aligned: both generators consumed the same draws
    assert torch.equal(torch.randn(3, generator=g_ours), torch.randn(3, generator=g_ref))


def test_ddim_eta_zero_draws_no_noise_and_eta_changes_result():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x = torch.randn(1, 4, 8, 8)
    det, _ = DDIM(10).step(fake_eps(x, 901), 901, x, generator=g)
    assert torch.equal(g.get_state(), state)
    stoch, _ = DDIM(10, eta=1.0).step(fake_eps(x, 901), 901, x, generator=g)
    assert not torch.allclose(det, stoch)


def test_fp16_stays_fp16_and_matches_diffusers():
    x = torch.randn(1, 4, 8, 8).half()
    eps = fake_eps(x, 981)
    x_prev, x0 = DDIM(50).step(eps, 981, x)
    ref = ref_ddim(50).step(eps, 981, x)
    assert x_prev.dtype == x0.dtype == torch.float16
    assert torch.equal(x_prev, ref.prev_sample) and torch.equal(x0, ref.pred_original_sample)
    xt = DDPM().q_sample(x, 500, eps)
    assert xt.dtype == torch.float16
    assert torch.equal(xt, ref_ddpm().add_noise(x, eps, torch.tensor([500])))


# --- DDPM ----------------------------------------------------------------------------------------------------


def test_q_sample_matches_add_noise():
    ddpm, ref = DDPM(), ref_ddpm()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert_parity(ddpm.q_sample(x0, 500, noise), ref.add_noise(x0, noise, torch.tensor(500)))
    t = torch.tensor([0, 481, 999])
    xt = ddpm.q_sample(x0, t, noise)
    assert_parity(xt, ref.add_noise(x0, noise, t))
    # per-sample t really is per sample: sample 1 equals the scalar-t result at 481
    assert_parity(xt[1], ddpm.q_sample(x0, 481, noise)[1])


@pytest.mark.parametrize("n", [None, 50])
def test_ddpm_ancestral_step_matches_diffusers(n):
    ddpm, ref = DDPM(), ref_ddpm()
    if n is None:
        timesteps = [999, 998, 500, 1, 0]
    else:
        ref.set_timesteps(n)
        timesteps = [981, 961, 501, 21, 1]
        assert ddpm.timesteps_for(n).tolist() == ref.timesteps.tolist()
    g_ours, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for t in timesteps:
        eps = fake_eps(x, t)
        x_prev, x0 = ddpm.step(eps, t, x, generator=g_ours, num_inference_steps=n)
        out = ref.step(eps, t, x, generator=g_ref)
        assert_parity(x_prev, out.prev_sample)
        assert_parity(x0, out.pred_original_sample)
        x = out.prev_sample
    assert torch.equal(torch.randn(3, generator=g_ours), torch.randn(3, generator=g_ref))


def test_forward_reference_matches_text_to_video_zero_forward_loop():
    from diffusers import TextToVideoZeroPipeline

    x_t0 = torch.randn(3, 4, 8, 8)
    pipe = types.SimpleNamespace(scheduler=ref_ddpm())
    expected = TextToVideoZeroPipeline.forward_loop(pipe, x_t0, 881, 941, torch.Generator().manual_seed(5))
    noise = torch.randn(x_t0.shape, generator=torch.Generator().manual_seed(5), dtype=x_t0.dtype)  # as forward_loop
    assert_parity(DDPM().forward(x_t0, 881, 941, noise, marginal="reference"), expected)
    # and the exact marginal is a different number (one α later at each end)
    assert not torch.allclose(DDPM().forward(x_t0, 881, 941, noise, marginal="exact"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("t0", "t1"), [(881, 941), (0, 1), (100, 700)])
def test_forward_exact_closed_form(t0, t1):
    ddpm = DDPM()
    one, zero = torch.ones(1), torch.zeros(1)
    a = ddpm.forward(one, t0, t1, zero, marginal="exact") ** 2  # √a · 1 + √(1−a) · 0, squared
    assert math.isclose(a.item(), torch.prod(ddpm.alphas[t0 + 1 : t1 + 1]).item(), rel_tol=1e-6)
    assert math.isclose(a.item(), (ddpm.alphas_cumprod[t1] / ddpm.alphas_cumprod[t0]).item(), rel_tol=1e-5)
    noise_coeff = ddpm.forward(zero, t0, t1, one, marginal="exact")
    assert math.isclose(noise_coeff.item() ** 2, 1 - a.item(), rel_tol=1e-5)
    a_ref = ddpm.forward(one, t0, t1, zero, marginal="reference") ** 2
    assert math.isclose(a_ref.item(), torch.prod(ddpm.alphas[t0:t1]).item(), rel_tol=1e-6)


def test_q_sample_then_forward_has_the_marginal_of_q_sample():
    """x_0 → q_sample to t0 → forward to t1 must be distributed as q(x_{t1} | x_0) = N(√ᾱ_{t1} x_0, 1−ᾱ_{t1})."""
    ddpm, t0, t1, N = DDPM(), 300, 400, 1 << 20
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((N,), 2.0)
    x_t1 = ddpm.forward(ddpm.q_sample(x0, t0, torch.randn(N, generator=g)), t0, t1, torch.randn(N, generator=g))
    ab = ddpm.alphas_cumprod[t1].item()
    mean_bound, var_bound = 0.01, 0.01 * (1 - ab)  # ~7 and ~5 standard errors at N = 2^20
    assert abs(x_t1.mean().item() - 2.0 * math.sqrt(ab)) < mean_bound
    assert abs(x_t1.var().item() - (1 - ab)) < var_bound
    # the bounds are meaningful: the classic bug a = ᾱ_{t1} (noising x_{t0} as if it were x_0) lands far outside
    ab0 = ddpm.alphas_cumprod[t0].item()
    wrong_mean, wrong_var = 2.0 * math.sqrt(ab * ab0), ab * (1 - ab0) + (1 - ab)
    assert abs(wrong_mean - 2.0 * math.sqrt(ab)) > 10 * mean_bound
    assert abs(wrong_var - (1 - ab)) > 10 * var_bound


# --- noise draws and devices ---------------------------------------------------------------------------------


def test_draw_noise_matches_randn_tensor():
    ours = draw_noise((2, 4, 8, 8), torch.Generator().manual_seed(9), "cpu", torch.float32)
    ref = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(9), device=torch.device("cpu"))
    assert torch.equal(ours, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_with_cpu_generator_match_diffusers():
    ours, ref = DDIM(10, eta=1.0), ref_ddim(10)
    x = torch.randn(1, 4, 8, 8).cuda()
    eps = fake_eps(x, 901)
    a, x0 = ours.step(eps, 901, x, generator=torch.Generator().manual_seed(4))
    b = ref.step(eps, 901, x, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert a.device.type == "cuda" and a.dtype == torch.float32
    assert_parity(a, b.prev_sample)
    assert_parity(x0, b.pred_original_sample)
    cpu_draw = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(draw_noise((1, 4, 8, 8), torch.Generator().manual_seed(4), "cuda").cpu(), cpu_draw)


# --- bad arguments -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DDIM(0), "num_inference_steps=0"),
        (lambda: DDIM(1001), "num_inference_steps=1001"),
        (lambda: DDIM(1000), "num_inference_steps=1000 with steps_offset=1"),
        (lambda: DDIM(50.0), "num_inference_steps=50.0"),
        (lambda: DDIM(50, eta=-0.1), "eta=-0.1"),
        (lambda: DDIM(50, eta=float("nan")), "eta=nan"),
        (lambda: DDIM(50, steps_offset=-1), "steps_offset=-1"),
        (lambda: DDIM(50).step(torch.zeros(1, 4), 1000, torch.zeros(1, 4)), "t=1000"),
        (lambda: DDIM(50).step(torch.zeros(1, 4), 981, torch.zeros(2, 4)), r"eps shape \(1, 4\)"),
        (lambda: scaled_linear_alphas_cumprod(0), "num_train_timesteps=0"),
        (lambda: scaled_linear_alphas_cumprod(beta_end=1.5), "beta_end=1.5"),
        (lambda: DDPM().forward(torch.zeros(1), 941, 881, torch.zeros(1)), "t0=941, t1=881"),
        (lambda: DDPM().forward(torch.zeros(1), 881, 881, torch.zeros(1)), "t0=881, t1=881"),
        (lambda: DDPM().forward(torch.zeros(1), 881, 1000, torch.zeros(1)), "t1=1000"),
        (lambda: DDPM().forward(torch.zeros(1), 881, 941, torch.zeros(1), marginal="paper"), "marginal='paper'"),
        (lambda: DDPM().q_sample(torch.zeros(2, 4), torch.tensor([0, 1000]), torch.zeros(2, 4)), r"t=\[0, 1000\]"),
        (lambda: DDPM().q_sample(torch.zeros(2, 4), -1, torch.zeros(2, 4)), "t=-1"),
        (lambda: DDPM().step(torch.zeros(1, 4), 981, torch.zeros(1, 4), num_inference_steps=0), "steps=0"),
        (lambda: DDPM().timesteps_for(1000), "num_inference_steps=1000 with steps_offset=1"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()

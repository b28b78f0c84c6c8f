"""DDPM (Ho et al. 2020): forward noising q (Eq. 4 and its multi-step form) and the ancestral step (Eq. 7, 11).

`forward` is Text2Video-Zero's DDPM forward from T₀ to T₁ (Algorithm 1 step 4, docs/method.md). The exact marginal is
q(x_{t1} | x_{t0}) = N(√a x_{t0}, (1 − a) I) with a = ᾱ_{t1}/ᾱ_{t0} = ∏_{t=t0+1}^{t1} α_t; both reference
implementations use ∏_{t=t0}^{t1−1} α_t (one step early), available as `marginal="reference"`.

The ancestral step follows diffusers' `DDPMScheduler.step` ("fixed_small" variance, no clipping) operation by
operation; schedule quantities are 0-dim float32 CPU tensors so inputs keep their dtype and device.
"""
from __future__ import annotations

import torch

from .noise_schedule import draw_noise, scaled_linear_alphas_cumprod

MARGINALS = ("exact", "reference")


class DDPM:
    """The DDPM forward process and ancestral sampler on the SD 1.5 schedule."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        steps_offset: int = 1,
    ):
        self.betas, self.alphas, self.alphas_cumprod = scaled_linear_alphas_cumprod(
            num_train_timesteps, beta_start, beta_end
        )
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"steps_offset={steps_offset!r}: expected an int ≥ 0 (SD 1.5: 1)")
        self.num_train_timesteps = num_train_timesteps
        self.steps_offset = steps_offset

    def _check_t(self, t: int, name: str = "t") -> int:
        t = int(t)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"{name}={t}: expected 0 ≤ {name} < {self.num_train_timesteps}")
        return t

    def _step_ratio(self, num_inference_steps: int | None) -> int:
        n, T = num_inference_steps, self.num_train_timesteps
        if n is None:
            return 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps={n!r}: expected None or an int in 1..{T}")
        return T // n

    def timesteps_for(self, num_inference_steps: int) -> torch.Tensor:
        """The "leading" timesteps of a `num_inference_steps` sampling loop, descending, int64 of shape (steps,)."""
        n, r = num_inference_steps, self._step_ratio(num_inference_steps)
        timesteps = torch.arange(n - 1, -1, -1, dtype=torch.int64) * r + self.steps_offset
        if timesteps[0] >= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={n} with steps_offset={self.steps_offset} starts at timestep "
                f"{int(timesteps[0])}, outside 0..{self.num_train_timesteps - 1}; use fewer steps or a smaller offset"
            )
        return timesteps

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DDPM Eq. 4: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε. x0, noise (n, c, h, w); t an int or an (n,) LongTensor.

        Like diffusers' `add_noise`, ᾱ is first cast to x0's dtype.
        """
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            if t.ndim != 1 or t.shape[0] != x0.shape[0]:
                raise ValueError(
                    f"t of shape {tuple(t.shape)}: expected an int or one timestep per sample, ({x0.shape[0]},)"
                )
            if t.min() < 0 or t.max() >= self.num_train_timesteps:
                raise ValueError(f"t={t.tolist()}: expected every 0 ≤ t < {self.num_train_timesteps}")
            t = t.to(x0.device)
        else:
            t = self._check_t(t)
        alpha_bar = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t]
        alpha_bar = alpha_bar.reshape(alpha_bar.shape + (1,) * (x0.ndim - alpha_bar.ndim))  # (n, 1, 1, 1)
        return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise

    def forward(
        self, x_t0: torch.Tensor, t0: int, t1: int, noise: torch.Tensor, marginal: str = "exact"
    ) -> torch.Tensor:
        """Sample q(x_{t1} | x_{t0}) for t0 < t1: x_{t1} = √a x_{t0} + √(1−a) ε; x_t0, noise (n, c, h, w).

        marginal="exact": a = ∏_{t=t0+1}^{t1} α_t = ᾱ_{t1}/ᾱ_{t0} (DDPM Eq. 4 composed over t0 → t1).
        marginal="reference": a = ∏_{t=t0}^{t1−1} α_t, as the authors' repo and diffusers' `forward_loop` compute.
        """
        if marginal not in MARGINALS:
            raise ValueError(f"marginal={marginal!r}: expected one of {MARGINALS}")
        t0, t1 = self._check_t(t0, "t0"), self._check_t(t1, "t1")
        if t0 >= t1:
            raise ValueError(f"t0={t0}, t1={t1}: the forward process needs t0 < t1")
        a = torch.prod(self.alphas[t0 + 1 : t1 + 1] if marginal == "exact" else self.alphas[t0:t1])
        return torch.sqrt(a) * x_t0 + torch.sqrt(1 - a) * noise

    def step(
        self,
        eps: torch.Tensor,
        t: int | torch.Tensor,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral step (x_{t_prev}, x̂_0) from ε̂ = eps and x = x_t, both (n, c, h, w) (any equal shapes).

        x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t                                  (Eq. 4 solved for x_0)
        μ̃ = √ᾱ_prev β_t / (1−ᾱ_t) x̂_0 + √α_t (1−ᾱ_prev) / (1−ᾱ_t) x_t    (Eq. 7)
        x_{t_prev} = μ̃ + √β̃_t z,  β̃_t = (1−ᾱ_prev)/(1−ᾱ_t) β_t        (Eq. 7; sampling as in Eq. 11)
        z ~ N(0, I) is drawn only for t > 0. Here α_t = ᾱ_t/ᾱ_prev and β_t = 1 − α_t span the whole jump
        t → t_prev = t − T // num_inference_steps (t − 1 when None); ᾱ_prev = 1 once t_prev < 0.
        """
        if eps.shape != x.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} != x shape {tuple(x.shape)}")
        t = self._check_t(t)
        prev_t = t - self._step_ratio(num_inference_steps)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        x0_pred = (x - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)
        x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        xt_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        x_prev = x0_coeff * x0_pred + xt_coeff * x
        if t > 0:
            variance = torch.clamp(beta_prod_t_prev / beta_prod_t * current_beta_t, min=1e-20)  # β̃_t
            x_prev = x_prev + variance**0.5 * draw_noise(eps.shape, generator, eps.device, eps.dtype)
        return x_prev, x0_pred

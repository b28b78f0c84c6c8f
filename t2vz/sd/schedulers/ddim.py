"""DDIM sampling (Song et al. 2021, Eq. 12) with the Stable Diffusion 1.5 settings.

SD 1.5 settings: "leading" timestep spacing with offset 1 (981, 961, …, 21, 1 at 50 steps) and, for the final
step, the "previous" ᾱ is ᾱ_0 = alphas_cumprod[0] rather than 1 (diffusers' `set_alpha_to_one=False`).

The arithmetic follows diffusers' `DDIMScheduler.step` operation by operation, so fp32 results are bitwise equal.
`inverse_step` runs the same update backwards (DDIM inversion, x_{t_prev} → x_t), following diffusers'
`DDIMInverseScheduler.step` the same way.
Every schedule quantity is a 0-dim float32 CPU tensor: multiplying a (n, c, h, w) tensor by it keeps the
tensor's dtype (fp16 stays fp16) and device.
"""
from __future__ import annotations

import math

import torch

from .noise_schedule import draw_noise, scaled_linear_alphas_cumprod


class DDIM:
    """DDIM sampler: `timesteps` to iterate over, `step` to go from x_t to x_{t_prev}."""

    def __init__(
        self,
        num_inference_steps: int,
        eta: float = 0.0,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        steps_offset: int = 1,
    ):
        _, _, self.alphas_cumprod = scaled_linear_alphas_cumprod(num_train_timesteps, beta_start, beta_end)
        n, T = num_inference_steps, num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps={n!r}: expected an int with 1 ≤ num_inference_steps ≤ {T}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"steps_offset={steps_offset!r}: expected an int ≥ 0 (SD 1.5: 1)")
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta={eta!r}: expected a finite number ≥ 0 (0 = deterministic DDIM, 1 = DDPM-like)")
        self.num_train_timesteps = T
        self.num_inference_steps = n
        self.eta = float(eta)
        self.step_ratio = T // n
        # "leading" spacing: 0, r, 2r, … shifted by the offset, largest first.
        self.timesteps = torch.arange(n - 1, -1, -1, dtype=torch.int64) * self.step_ratio + steps_offset
        if self.timesteps[0] >= T:
            raise ValueError(
                f"num_inference_steps={n} with steps_offset={steps_offset} starts at timestep "
                f"{int(self.timesteps[0])}, outside 0..{T - 1}; use fewer steps or a smaller offset"
            )
        self.final_alpha_cumprod = self.alphas_cumprod[0]  # set_alpha_to_one=False

    def prev_timestep(self, t: int | torch.Tensor) -> int:
        """The timestep after t in the sampling loop, t − T // steps; negative means t was the final step."""
        return int(t) - self.step_ratio

    def alpha_bar(self, t: int | torch.Tensor) -> torch.Tensor:
        """ᾱ_t as a 0-dim float32 tensor; ᾱ_0 for t < 0 (the "previous" ᾱ of the final step)."""
        t = int(t)
        if t >= self.num_train_timesteps:
            raise ValueError(f"timestep t={t}: expected t < num_train_timesteps={self.num_train_timesteps}")
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def checked_step(self, eps: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor) -> int:
        """A step's arguments checked (eps and x of one shape, 0 ≤ t < T): t as an int; ValueError naming the bad one."""
        if eps.shape != x.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} != x shape {tuple(x.shape)}")
        t = int(t)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep t={t}: expected 0 ≤ t < {self.num_train_timesteps}")
        return t

    def step(
        self, eps: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM Eq. 12: (x_{t_prev}, x̂_0) from ε̂ = eps and x = x_t, both (n, c, h, w) (any equal shapes).

        x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t
        x_{t_prev} = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ_t²) ε̂ + σ_t z
        σ_t = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)   (Eq. 16)
        z ~ N(0, I) is drawn from `generator` only when η > 0.
        """
        t = self.checked_step(eps, t, x)
        alpha_prod_t = self.alpha_bar(t)
        alpha_prod_t_prev = self.alpha_bar(self.prev_timestep(t))
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        x0_pred = (x - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)

        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = self.eta * variance ** (0.5)
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps  # "direction pointing to x_t"
        x_prev = alpha_prod_t_prev ** (0.5) * x0_pred + direction
        if self.eta > 0:
            x_prev = x_prev + std_dev_t * draw_noise(eps.shape, generator, eps.device, eps.dtype)
        return x_prev, x0_pred

    def inverse_step(self, eps: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM inversion, Eq. 12 run backwards with η = 0: (x_t, x̂_0) from x = x_{t_prev}, t_prev = t − T // steps,
        and ε̂ = eps evaluated at timestep t (on x_{t_prev}: the inversion's one approximation, ε(x_t, t) being
        unknown before x_t is). Both (n, c, h, w), any equal shapes.

        x̂_0 = (x_{t_prev} − √(1−ᾱ_prev) ε̂) / √ᾱ_prev
        x_t = √ᾱ_t x̂_0 + √(1 − ᾱ_t) ε̂
        For the first step (t_prev < 0) ᾱ_prev is ᾱ_0 = alphas_cumprod[0], the ᾱ the sampler's last step ends at
        (`final_alpha_cumprod`), so inverting starts exactly where sampling stops (diffusers' `DDIMInverseScheduler`
        built from SD 1.5's scheduler config, `set_alpha_to_one=False`).
        """
        t = self.checked_step(eps, t, x)
        alpha_prod_t_prev = self.alpha_bar(self.prev_timestep(t))  # where x is
        alpha_prod_t = self.alpha_bar(t)                           # where the step goes
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        x0_pred = (x - beta_prod_t_prev ** (0.5) * eps) / alpha_prod_t_prev ** (0.5)
        direction = (1 - alpha_prod_t) ** (0.5) * eps
        return alpha_prod_t ** (0.5) * x0_pred + direction, x0_pred

    def inversion_timesteps(self, up_to: int | None = None) -> torch.Tensor:
        """The timesteps DDIM inversion steps to, ascending (the sampling list reversed: 1, 21, …, 981 at 50 steps),
        those ≤ `up_to` only when given (e.g. T₁: invert an image to where Text2Video-Zero's motion starts)."""
        ascending = self.timesteps.flip(0)
        if up_to is None:
            return ascending
        if int(up_to) not in self.timesteps.tolist():
            raise ValueError(f"up_to={int(up_to)} is not one of this schedule's timesteps ({int(ascending[0])}, "
                             f"{int(ascending[1]) if len(ascending) > 1 else ''}, …, {int(ascending[-1])})")
        return ascending[ascending <= int(up_to)]

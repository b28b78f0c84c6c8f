"""Tune-A-Video (Wu et al., ICCV 2023): one-shot tuning of an inflated text-to-image model on one video and its
prompt, then editing that video by other prompts.

1. Inflate (`sd.temporal.inflate`): sparse-causal attention in `attn1` (frame k attends to frames 1 and k−1,
   `CrossFrame(f, "first+previous")`) and a temporal self-attention layer after every feed-forward.
2. Tune (`tune`): the latent diffusion objective on the source video V and its prompt c,

       min_θ E_{z₀, ε ~ N(0, I), t} ‖ε − ε_θ(z_t, t, c)‖²,   z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε   (DDPM Eq. 4)

   z₀ = E(V) × scaling_factor, a posterior sample per step, t uniform in 0..999, ᾱ_t SD 1.5's schedule. Only the
   modules named in `TRAINABLE` learn: the query projections of self- and cross-attention and the whole temporal
   attention (the paper: "W^Q in ST-Attn and Cross-Attn, and T-Attn"); every other weight stays the image model's.
3. Edit (`TuneAVideo.edit`): V* = D(DDIM-samp(DDIM-inv(E(V)), c*)): the source latents DDIM-inverted with the
   tuned model and the empty prompt (`method.inversion.ddim_invert`), then DDIM with classifier-free guidance from
   those latents for each edit prompt c*, all frames at once with sparse-causal attention.

What follows the authors' code (showlab/Tune-A-Video: train_tuneavideo.py, configs/*.yaml, tuneavideo/util.py):
AdamW with betas (0.9, 0.999), weight decay 1e-2, eps 1e-8, a constant learning rate 3e-5, gradients clipped to
norm 1.0, 500 steps, one video a step; the loss in float32 with `reduction="mean"`; the posterior sampled afresh
every step (they encode the video every step; t2vz encodes it once and draws mean + std·ε); one timestep per video;
trainable modules matched by name suffix; inversion with the prompt "" and no guidance, as many steps as sampling
(their `num_inv_steps` = `num_inference_steps` = 50), sampling with guidance 12.5. Where t2vz differs: the model
tunes in float32 (theirs: fp16 mixed precision and xformers), gradient checkpointing is optional (theirs: on),
`attn_temp.to_out.0`'s bias starts at zero (`sd.temporal`), frames are the video's first `num_frames` (theirs: a
start index and a stride), and the edit inverts the posterior's mode of the source (theirs: the posterior sample of
the last training step).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..sd.attention import CrossFrame, Transformer2D
from ..sd.loading import StableDiffusion, load, require_sd15
from ..sd.model_folder import resolve_model_path
from ..sd.resnet import ResnetBlock2D
from ..sd.schedulers import DDIM, DDPM, draw_noise
from ..sd.temporal import (
    TUNED_FORMAT, TUNED_FORMAT_VERSION, base_unet_sha256, inflate, is_inflated, temporal_keys,
)
from ..video_io import atomic_path, load_frames, resize_frames
from .inversion import Inversion, ddim_invert
from .sampling import check_size, ddim_denoise, decode_video, encode_prompts

# the authors' trainable modules (train_tuneavideo.py, configs/*.yaml): a module learns if its qualified name ends
# with one of these. "attn_temp" is the temporal attention's projections; its LayerNorm `norm_temp` matches none,
# so it keeps its init (weight 1, bias 0), as theirs does.
TRAINABLE = ("attn1.to_q", "attn2.to_q", "attn_temp")
SPARSE_CAUSAL = "first+previous"  # attn1 of the inflated model: frame k attends to frames 1 and k−1
NAME_EXAMPLES = ("attn1.to_q", "attn1.to_k", "attn2.to_q", "attn2.to_v", "attn_temp", "norm_temp", "ff", "norm1")


def trainable_parameters(unet: nn.Module, names: Sequence[str] = TRAINABLE) -> dict[str, nn.Parameter]:
    """The parameters of the modules whose qualified name ends with one of `names` (the authors' rule), by their
    state-dict keys. ValueError naming a name that matches no module, with examples of valid ones."""
    if isinstance(names, str) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"trainable={names!r} must be a non-empty list of module name suffixes, e.g. "
                         f"{list(TRAINABLE)} (the authors')")
    modules = dict(unet.named_modules())
    unknown = [n for n in names if not any(name.endswith(n) for name in modules)]
    if unknown:
        raise ValueError(f"trainable module name(s) {', '.join(map(repr, unknown))} match no module of this UNet; "
                         f"a name is a suffix of a module's qualified name, e.g. {', '.join(NAME_EXAMPLES)}")
    chosen = [name for name in modules if name and name.endswith(tuple(names))]
    return {f"{name}.{key}": p for name in chosen for key, p in modules[name].named_parameters()}


def source_frames(sd: StableDiffusion, video, num_frames: int | None, height: int | None,
                  width: int | None) -> torch.Tensor:
    """The source video (a file, a folder of frames, or frames (F, H, W, 3), `video_io.load_frames`): its first
    `num_frames` frames (all when None) resized to height × width (None: the model's own size) → (f, H, W, 3)."""
    if num_frames is not None and (isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 1):
        raise ValueError(f"num_frames={num_frames!r} must be an integer >= 1 or None (all frames)")
    frames = load_frames(video, "video", max_frames=num_frames)
    if num_frames is not None and len(frames) < num_frames:
        raise ValueError(f"num_frames={num_frames} but the video has only {len(frames)} frames; pass "
                         f"num_frames <= {len(frames)}")
    size = sd.image_size(height, width)
    check_size(*size, sd.vae.downsample_factor)
    return resize_frames(frames, size)


@torch.no_grad()
def encode_frames(sd: StableDiffusion, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (f, H, W, 3) in [0, 1] → the VAE posterior q(z | x) of each, (mean, std) (f, c, H/8, W/8), unscaled,
    in the model's dtype; one frame at a time, so memory does not grow with the video's length."""
    images = frames.permute(0, 3, 1, 2).to(sd.device) * 2 - 1  # [0, 1] → [−1, 1]
    posteriors = [sd.vae.posterior(image[None]) for image in images]
    return tuple(torch.cat([getattr(p, key) for p in posteriors]).to(sd.dtype) for key in ("mean", "std"))


def denoising_loss(unet: nn.Module, z0: torch.Tensor, context: torch.Tensor, f: int, ddpm: DDPM,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """‖ε − ε_θ(z_t, t, c)‖² (mean) for one video's scaled latents z0 (f, c, h, w): ε ~ N(0, I) and then one t
    uniform in 0..T−1 drawn from `generator`, z_t by DDPM's forward process (`DDPM.q_sample`), the UNet with
    sparse-causal attention over the f frames and the text rows `context` (1, n, d)."""
    eps = draw_noise(z0.shape, generator, z0.device, z0.dtype)
    draw_device = generator.device if generator is not None else "cpu"
    t = int(torch.randint(0, ddpm.num_train_timesteps, (1,), generator=generator, device=draw_device))
    pred = unet(ddpm.q_sample(z0, t, eps), t, context, cross_frame=CrossFrame(f, SPARSE_CAUSAL))
    return F.mse_loss(pred.float(), eps.float(), reduction="mean")


@contextmanager
def checkpointed(unet: nn.Module, enabled: bool = True):
    """Inside, every transformer (`Transformer2D`) and resnet of `unet` recomputes its activations in the backward
    pass instead of keeping them (`torch.utils.checkpoint`, non-reentrant): memory for compute, the same
    gradients."""
    modules = [m for m in unet.modules() if isinstance(m, (Transformer2D, ResnetBlock2D))] if enabled else []
    for module in modules:
        module.forward = partial(checkpoint, module.forward, use_reentrant=False)
    try:
        yield
    finally:
        for module in modules:
            del module.forward  # the class's forward again


def check_tuning(sd: StableDiffusion, prompt, steps, lr, weight_decay, max_grad_norm) -> None:
    require_sd15(sd, "Tune-A-Video")
    if sd.unet.config.in_channels != sd.vae.config.latent_channels:
        raise ValueError(f"the UNet takes {sd.unet.config.in_channels} input channels, not the VAE's "
                         f"{sd.vae.config.latent_channels} latent channels: Tune-A-Video tunes a text-to-image model")
    if sd.dtype != torch.float32:
        raise ValueError(f"Tune-A-Video tunes in float32 and this model is {sd.dtype}: load it with "
                         "dtype=torch.float32")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt={prompt!r} must be the source video's description, a non-empty string")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1 (the authors: 500)")
    for name, value, low in (("lr", lr, 0.0), ("weight_decay", weight_decay, None),
                             ("max_grad_norm", max_grad_norm, 0.0)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or (low is not None and value <= low) or (low is None and value < 0):
            raise ValueError(f"{name}={value!r} must be a finite number {'>= 0' if low is None else '> 0'} "
                             "(the authors: lr 3e-5, weight_decay 1e-2, max_grad_norm 1.0)")


def tune(
    sd: StableDiffusion,
    video,
    prompt: str,
    steps: int = 500,
    lr: float = 3e-5,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    trainable: Sequence[str] = TRAINABLE,
    gradient_checkpointing: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    weight_decay: float = 1e-2,
    max_grad_norm: float = 1.0,
) -> list[float]:
    """One-shot tuning (module docstring, step 2) of `sd`'s UNet on `video` described by `prompt`, in place: the UNet
    is inflated first if it is not, and only the `trainable` modules' parameters change (and get gradients).
    Returns the loss of each step; `on_step(step, loss)` sees it after each (step counts from 1).

    `video`: a file, a folder of frames, or frames (F, H, W, 3) (`video_io.load_frames`), its first `num_frames`
    (all when None) resized to height × width (None: the model's own size). AdamW (betas 0.9/0.999, eps 1e-8,
    `weight_decay`) at the constant rate `lr`, gradients clipped to `max_grad_norm`. `generator` seeds every draw:
    per step the posterior sample, ε, then t. The model must be float32 (`t2vz.load(..., dtype=torch.float32)`).
    `gradient_checkpointing`: recompute activations in the backward pass (`checkpointed`)."""
    check_tuning(sd, prompt, steps, lr, weight_decay, max_grad_norm)
    unet = inflate(sd.unet)
    trained = list(trainable_parameters(unet, trainable).values())  # an unknown name fails here, before any work
    frames = source_frames(sd, video, num_frames, height, width)
    f = frames.shape[0]
    mean, std = encode_frames(sd, frames)
    with torch.no_grad():
        context = sd.text_encoder([prompt]).to(device=sd.device, dtype=sd.dtype)  # (1, 77, d): all frames share it
    ddpm, scale = DDPM(), sd.vae.config.scaling_factor
    unet.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)
    losses = []
    try:
        with checkpointed(unet, gradient_checkpointing):
            bar = tqdm(range(1, steps + 1), desc=f"Tune-A-Video ({f} frames)", disable=not progress, leave=False)
            for step in bar:
                z0 = (mean + std * draw_noise(mean.shape, generator, mean.device, mean.dtype)) * scale
                loss = denoising_loss(unet, z0, context, f, ddpm, generator)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if on_step is not None:
                    on_step(step, losses[-1])
    finally:
        unet.requires_grad_(False)  # inference again: no graphs, as `t2vz.load` leaves a model
    return losses


def save_tuned(path: str | os.PathLike, unet: nn.Module, base_model: str | os.PathLike,
               names: Sequence[str] = TRAINABLE, num_frames: int | None = None, prompt: str | None = None) -> Path:
    """Write the tuned weights of an inflated `unet` to a safetensors file at `path`, atomically (a temporary file
    beside it, then one `os.replace`), and return the path.

    The file holds the tensors of the modules named in `names` (`trainable_parameters`) and every temporal layer's
    (`norm_temp`, `attn_temp`), trained or not: the temporal layers are not in the base model, so the file must
    carry them for `t2vz.load(base_model, tuned=path)` to rebuild the tuned UNet exactly; the other modules are the
    base's. Keys are the inflated UNet's state-dict keys. Metadata: the format tag, the base model (`base_model`
    as given, and the sha256 of its folder's unet.safetensors, checked at load), the trainable names, `num_frames`
    and `prompt`. A base with LoRAs merged in is not recorded: load the file with the same LoRAs."""
    if not is_inflated(unet):
        raise ValueError("this UNet has no temporal layers: tune it (tune, TuneAVideo.tune) before saving it")
    state = unet.state_dict()
    keys = sorted(set(trainable_parameters(unet, names)) | set(temporal_keys(unet)))
    tensors = {k: state[k].detach().contiguous().cpu() for k in keys}
    metadata = {
        "format": TUNED_FORMAT, "format_version": TUNED_FORMAT_VERSION, "base_model": str(base_model),
        "base_unet_sha256": base_unet_sha256(resolve_model_path(base_model)), "trainable": json.dumps(list(names)),
        "num_frames": str(num_frames if num_frames is not None else 0), "prompt": prompt or "",
    }
    path = Path(path)
    try:
        tmp = atomic_path(path)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}; choose a writable folder") from None
    try:
        tmp.write_bytes(safetensors_bytes(tensors, metadata=metadata))  # into the file `atomic_path` made
        os.replace(tmp, path)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


class TuneAVideo:
    """`pipe = TuneAVideo.from_pretrained("toyworld")`; `pipe.tune("source.mp4", "a red circle on grass")`;
    `videos = pipe.edit("source.mp4", ["a blue square on grass", "a red circle on snow"])`; `pipe.save(FILE)`;
    later `TuneAVideo.from_pretrained("toyworld", tuned=FILE)` edits with the tuned weights without tuning again.

    `TuneAVideo(sd)` inflates `sd`'s UNet in place (untuned, it draws as the image model with sparse-causal
    attention). `base`: the model folder or name `sd` was loaded from, which `save` records."""

    def __init__(self, components: StableDiffusion, base: str | os.PathLike | None = None):
        require_sd15(components, "TuneAVideo")
        inflate(components.unet)
        self.sd, self.base = components, base
        tuned = components.config.get("tuned", {})  # what `t2vz.load(..., tuned=FILE)` read from the file
        self.prompt: str | None = tuned.get("prompt") or None
        self.num_frames: int | None = tuned.get("num_frames") or None
        self.trainable: tuple[str, ...] = tuple(tuned.get("trainable", TRAINABLE))

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, tuned: str | os.PathLike | None = None, device="cpu",
                        dtype=torch.float32) -> TuneAVideo:
        """A model folder (or a shipped model's name) and, optionally, tuned weights for it (`save_tuned`)."""
        return cls(load(base, device=device, dtype=dtype, tuned=tuned), base)

    def tune(self, video, prompt: str, num_frames: int | None = None, height: int | None = None,
             width: int | None = None, trainable: Sequence[str] = TRAINABLE, **kwargs) -> list[float]:
        """`tune` on this model (keywords as there); remembers the prompt, frame count and trainable names."""
        frames = source_frames(self.sd, video, num_frames, height, width)
        losses = tune(self.sd, frames, prompt, height=frames.shape[1], width=frames.shape[2], trainable=trainable,
                      **kwargs)
        self.prompt, self.num_frames, self.trainable = prompt, frames.shape[0], tuple(trainable)
        return losses

    def save(self, path: str | os.PathLike) -> Path:
        """`save_tuned` of this model's UNet, its base, trainable names, frame count and prompt."""
        if self.base is None:
            raise ValueError("no base model to record: build the pipeline with TuneAVideo.from_pretrained(base) or "
                             "TuneAVideo(sd, base=...)")
        return save_tuned(path, self.sd.unet, self.base, self.trainable, self.num_frames, self.prompt)

    def invert(self, frames: torch.Tensor, scheduler: DDIM, progress: bool = True) -> Inversion:
        """DDIM-inv(E(V)): frames (f, H, W, 3) → their scaled latents (the posterior's mode × scaling_factor)
        inverted with this model, the prompt "" without guidance (the authors' `ddim_inversion(..., prompt="")`),
        and sparse-causal attention over the f frames, at every timestep of `scheduler`."""
        mean, _ = encode_frames(self.sd, frames)
        context = encode_prompts(self.sd, "", guidance=False).context  # (1, 77, d): the text branch of ""
        f = frames.shape[0]
        return ddim_invert(self.sd, mean * self.sd.vae.config.scaling_factor, context, scheduler,
                           cross_frame=CrossFrame(f, SPARSE_CAUSAL), progress=progress,
                           desc=f"DDIM inversion ({f} frames)")

    @torch.no_grad()
    def edit(
        self,
        video,
        prompts: str | Sequence[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 12.5,
        negative_prompt: str | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """V* = D(DDIM-samp(DDIM-inv(E(V)), c*)) for each edit prompt c*: frames (len(prompts), f, H, W, 3) in
        [0, 1] on the CPU, or (f, H, W, 3) for one prompt given as a string.

        `video` as for `tune`; `num_frames` None: the frame count it was tuned on (all frames if unknown). The source
        is inverted once (`invert`); each prompt is then sampled from the inverted latents with DDIM (`eta`, noise
        from `generator` when > 0) and classifier-free guidance `guidance_scale` against `negative_prompt` ("" by
        default), all frames in one UNet call with sparse-causal attention."""
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts) \
            if isinstance(prompts, (list, tuple)) else []
        if not prompt_list or not all(isinstance(p, str) for p in prompt_list):
            raise ValueError(f"prompts={prompts!r} must be an edit prompt or a non-empty list of them")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0 (the authors: 12.5)")
        scheduler = DDIM(num_inference_steps, eta=eta)
        frames = source_frames(self.sd, video, num_frames or self.num_frames, height, width)
        f = frames.shape[0]
        x_T = self.invert(frames, scheduler, progress).final
        videos = []
        for prompt in prompt_list:
            text = encode_prompts(self.sd, prompt, negative_prompt, guidance=guidance_scale > 1.0, one_prompt=True)
            x_0 = ddim_denoise(self.sd, x_T, scheduler, scheduler.timesteps, text.context, guidance_scale, generator,
                               cross_frame=CrossFrame(f, SPARSE_CAUSAL), desc=f"DDIM (Tune-A-Video, {f} frames)",
                               progress=progress)
            videos.append(decode_video(self.sd, x_0, f)[0])
        return videos[0] if isinstance(prompts, str) else torch.stack(videos)

"""Conditional Text2Video-Zero (Khachatryan et al., ICCV 2023, Sec. 3.4): a ControlNet (Zhang et al. 2023) steers
every frame with its own control map (edges, pose, depth), and cross-frame attention keeps the frames one video.

The steps, with the text-to-video ones they replace (docs/method.md):
  1. `draw_video_noise`   x_T ~ N(0, I) once per video, the same for every frame: the control maps carry the motion,
                          so there is no warp and no Δt (T′ = T = 1000)
  2. `controlled_unet`    ε(x_t, t, c_text, c_control^k): the ControlNet, with cross-frame attention in its encoder
                          too, turns frame k's control map into residuals for the locked UNet's skips and mid block
  3. `sampling.ddim_loop` DDIM from T to 0 on all frames with classifier-free guidance and cross-frame attention
                          (Eq. 8) in the UNet
  4. `decode_video`       VAE decode of every frame
For long videos the UNet and ControlNet see a chunk of frames at a time (`chunks.py`).

The UNet batch is [uncond videos; text videos], each video's frames consecutive, `(2 b f) c h w`; the control maps
are the same for every video and both branches, so they are repeated to that layout.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch
from einops import repeat

from ..sd.attention import CrossFrame, check_cross_frame_mode
from ..sd.controlnet import ControlNet
from ..sd.loading import StableDiffusion, load, load_controlnet, require_sd15
from ..sd.model_folder import ModelFolderError
from ..sd.schedulers import DDIM
from ..video_io import load_frames, resize_frames, resized_shape
from .chunks import check_chunking, eps_by_chunks, frame_span
from .fast import FastModes, loop_unet_kwargs
from .sampling import check_size, checked_latents, ddim_loop, decode_video, encode_prompts, guided_eps, step_counter
from .text2video_zero import draw_first_frame_noise

# the UNet fields a ControlNet copies: they must be equal for its residuals to fit the UNet's skips
ENCODER_FIELDS = ("in_channels", "block_out_channels", "attention_levels", "layers_per_block", "num_attention_heads",
                  "cross_attention_dim", "norm_num_groups")


def check_compatible(unet_config, controlnet: ControlNet) -> None:
    """A ControlNet drives only the UNet whose encoder it copies: same widths, levels, heads and text width."""
    unet, cn = asdict(unet_config), asdict(controlnet.config)
    diffs = [f"{k} {cn[k]} vs {unet[k]}" for k in ENCODER_FIELDS if _as_tuple(cn[k]) != _as_tuple(unet[k])]
    if diffs:
        hint = " (cross_attention_dim 1024 is SD 2.x)" if cn["cross_attention_dim"] == 1024 else ""
        raise ModelFolderError(
            f"the ControlNet does not fit this model's UNet: {'; '.join(diffs)} (ControlNet vs UNet){hint}. A "
            "ControlNet is trained for one base model: use one made for SD 1.5 with an SD 1.5-shaped model")


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def draw_video_noise(shape: tuple[int, ...], generator, device, dtype) -> torch.Tensor:
    """Step 1: x_T (b, c, h, w), one draw per video, shared by all its frames (the first draw from `generator`)."""
    return draw_first_frame_noise(shape, generator, device, dtype)


def control_rows(control: torch.Tensor, rows: int) -> torch.Tensor:
    """Control maps (f, 3, H, W) → (rows, 3, H, W), repeated video-major to the UNet batch `(g f)` (g = branches ·
    videos; each group takes the f maps in frame order)."""
    return repeat(control, "f c h w -> (g f) c h w", g=rows // control.shape[0])


class ControlVideo:
    """`pipe = ControlVideo.from_pretrained(MODEL, controlnet=CONTROLNET)`;
    `frames = pipe("a dancing astronaut", control="pose.mp4")`."""

    def __init__(self, components: StableDiffusion, controlnet: ControlNet):
        require_sd15(components, "ControlVideo")
        check_compatible(components.unet.config, controlnet)
        factor = components.vae.downsample_factor
        if controlnet.config.control_downscale != factor:
            raise ModelFolderError(
                f"the ControlNet embeds control maps at 1/{controlnet.config.control_downscale} scale but the VAE "
                f"downsamples by {factor}: they must agree (SD 1.5: 8)")
        self.sd = components
        self.controlnet = controlnet.to(device=components.device, dtype=components.dtype)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, controlnet: str | os.PathLike | ControlNet, device="cpu",
                        dtype=torch.float32, lora=None) -> ControlVideo:
        """`path`: a t2vz model folder (any SD 1.5-shaped model: the base weights or a DreamBooth fine-tune);
        `controlnet`: a t2vz ControlNet folder (both written by `python -m weights_convert`) or a ControlNet;
        `lora`: [(file, scale), ...] merged into the model's weights (`t2vz.load`), not into the ControlNet."""
        sd = load(path, device=device, dtype=dtype, lora=lora)
        if not isinstance(controlnet, ControlNet):
            controlnet = load_controlnet(controlnet, device=device, dtype=dtype)
        return cls(sd, controlnet)

    def controlled_unet(self, control: torch.Tensor, scale: float) -> Callable[..., torch.Tensor]:
        """Step 2: ε for a UNet batch driven by the control maps `control` (f, 3, H, W) of the batch's frames."""
        def unet(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cross_frame: CrossFrame | None = None,
                 **fast):  # the fast modes' merging and cache act on the UNet only (tomesd patches the UNet)
            down, mid = self.controlnet(x, t, context, control_rows(control, x.shape[0]), scale, cross_frame)
            return self.sd.unet(x, t, context, cross_frame, down_residuals=down, mid_residual=mid, **fast)
        return unet

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        control=None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        resolution: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | Sequence[str] | None = None,
        controlnet_conditioning_scale: float = 1.0,
        cross_frame: str = "first",
        num_videos_per_prompt: int = 1,
        chunk_size: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        progress: bool = True,
        merging_ratio: float = 0.0,
        merging_max_downsample: int = 1,
        merging_options: dict | None = None,
        cache_interval: int = 1,
        cache_branch: int = 0,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate videos that follow `control`: frames (F, H, W, 3) float in [0, 1] for one prompt and one video,
        else (B, F, H, W, 3) with B = prompts × videos per prompt (prompt-major).

        `control`: one control map per frame, as the ControlNet was trained on them (a canny ControlNet takes
        white edges on black, `t2vz.method.canny.canny_edges`; pose and depth ControlNets take OpenPose skeletons and
        MiDaS depth maps, made by their own detectors): a video file, a folder of frames, or frames (F, H, W, 3),
        uint8 or float in [0, 1]. `num_frames`, `height` and `width` default to the control's; given, they must
        match it. `resolution` first resizes the control so that its long side is `resolution` (each side a
        multiple of 8). `controlnet_conditioning_scale` multiplies the ControlNet's residuals. `latents`
        (B, 4, H/8, W/8) replace the drawn x_T. `chunk_size` bounds memory for long videos: the UNet and the
        ControlNet see at most chunk_size frames at a time (`chunks.py`); with cross_frame "first" or "off" the
        frames equal unchunked generation. `merging_*` and `cache_*` are the fast modes (`fast.FastModes`): token
        merging and feature caching in the UNet; the ControlNet runs exactly at every step. `prompt_embeds`
        (b, n_tokens, d) replace `prompt` (prompt=None), `negative_prompt_embeds` (same shape) the
        `negative_prompt`, as in diffusers (`sampling.encode_prompts`): B = b × videos per prompt.
        """
        fast = FastModes(merging_ratio, merging_max_downsample, merging_options, cache_interval,
                         cache_branch).checked(self.sd.unet.config)
        merging = fast.token_merging(generator, self.sd.device)  # forked before the first draw from `generator`
        if control is None:
            raise ValueError("no control: give control=, one control map per frame (a video file, a folder of "
                             "frames, or frames (F, H, W, 3))")
        sd, factor = self.sd, self.sd.vae.downsample_factor
        maps = load_frames(control, "control")  # (f, H, W, 3) in [0, 1]
        if resolution is not None:
            maps = resize_frames(maps, resized_shape(*maps.shape[1:3], int(resolution), factor))
        f = self.check_inputs(maps, num_frames, height, width, guidance_scale, controlnet_conditioning_scale,
                              cross_frame, chunk_size)
        text = encode_prompts(sd, prompt, negative_prompt, guidance_scale > 1.0, num_videos_per_prompt,
                              prompt_embeds, negative_prompt_embeds)
        b, (height, width) = text.batch, maps.shape[1:3]
        scheduler = DDIM(num_inference_steps, eta=eta)
        context = text.context  # one row per video and branch

        shape = (b, sd.unet.config.out_channels, height // factor, width // factor)
        x_T = (draw_video_noise(shape, generator, sd.device, sd.dtype) if latents is None
               else checked_latents(sd, latents, shape, " (one x_T per video)"))
        # (f, 3, H, W), moved to the device once: per step, each chunk takes its maps as a view (`frame_span`),
        # where copying them from the host at every step would wait on the transfer; f·3·H·W values, the size of
        # the decoded video, small beside the UNet's activations
        maps = maps.permute(0, 3, 1, 2).to(device=sd.device, dtype=sd.dtype)

        on_step = step_counter(callback)
        attention = CrossFrame(f, cross_frame)
        unet_kwargs = loop_unet_kwargs(fast.cache, merging)

        def predict_chunk(x: torch.Tensor, t: torch.Tensor, ids: list[int], frames: CrossFrame) -> torch.Tensor:
            unet = self.controlled_unet(maps[frame_span(ids)], controlnet_conditioning_scale)
            return guided_eps(unet, x, t, context, guidance_scale, cross_frame=frames, **unet_kwargs(ids))

        x = repeat(x_T, "b c h w -> (b f) c h w", f=f)  # the same x_T for every frame
        x = ddim_loop(x, scheduler, scheduler.timesteps, eps_by_chunks(predict_chunk, attention, chunk_size), generator,
                      on_step, "DDIM (ControlNet, all frames)", progress)
        video = decode_video(sd, x, f)
        return video[0] if video.shape[0] == 1 else video

    def check_inputs(self, maps, num_frames, height, width, guidance_scale, scale, cross_frame, chunk_size) -> int:
        """Check the arguments against each other and the control maps (f, H, W, 3); returns f."""
        f, H, W = maps.shape[:3]
        if num_frames is not None and num_frames != f:
            raise ValueError(f"num_frames={num_frames} but the control video has {f} frames: give one control map "
                             "per frame (or num_frames=None to use them all)")
        for name, value, actual in (("height", height, H), ("width", width, W)):
            if value is not None and value != actual:
                raise ValueError(f"{name}={value} but the control maps are {H}×{W} (height×width): resize the "
                                 f"control video, pass resolution=..., or leave {name}=None")
        try:
            check_size(H, W, self.sd.vae.downsample_factor)
        except ValueError as e:
            raise ValueError(f"control maps of {H}×{W}: {e}; pass resolution=... to resize them") from None
        if not (math.isfinite(float(guidance_scale)) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale={guidance_scale} must be a finite number >= 0")
        if not math.isfinite(float(scale)):
            raise ValueError(f"controlnet_conditioning_scale={scale} must be a finite number")
        check_cross_frame_mode(cross_frame)
        check_chunking(chunk_size, cross_frame, f)
        return f

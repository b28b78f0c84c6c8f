"""Video Instruct-Pix2Pix (Khachatryan et al., ICCV 2023, Sec. 3.5): edit a video by a text instruction with an
InstructPix2Pix model (Brooks et al., CVPR 2023) whose self-attention is made cross-frame (T2V-Zero Eq. 8).

The InstructPix2Pix UNet takes 8 input channels: the noisy latent x_t ⊕ the source frame's VAE latent E(x). Every
DDIM step runs one UNet batch of three guidance branches, branch-major, each holding the f frames of the video:

    branch      rows          latent input       text context
    (T, I)      [0, f)        x_t ⊕ E(x)         instruction
    (I)         [f, 2f)       x_t ⊕ E(x)         negative prompt ("" by default)
    (∅)         [2f, 3f)      x_t ⊕ 0            negative prompt

and combines them with InstructPix2Pix's two-scale classifier-free guidance (Brooks et al., Eq. 3):

    ε = ε_∅ + s_T·(ε_{T,I} − ε_I) + s_I·(ε_I − ε_∅)

(s_T `guidance_scale`, s_I `image_guidance_scale`). Cross-frame attention treats the batch as three videos of f
frames, so each branch's frames attend to that branch's frame 1: what diffusers' CrossFrameAttnProcessor with
batch_size=3 does on StableDiffusionInstructPix2PixPipeline (the authors' code and diffusers' docs). Each frame
starts from its own noise; cross-frame attention alone carries the consistency (docs/method.md).

One named function per step:
  1. `source_size` + `video_io.resize_frames`   frames scaled so the long side is the resolution
  2. `encode_source`                            E(x): the VAE posterior's mode, unscaled (as diffusers)
  3. `branch_contexts` + `branch_batch`         the three branches' text rows and 8-channel UNet input
  4. `instruct_guidance`                        Eq. 3 above, inside a DDIM loop (`sampling.ddim_loop`)
  5. `sampling.decode_video`                    VAE decode of every frame, [−1, 1] → [0, 1]
For long videos the UNet sees a chunk of frames of each branch at a time (`chunks.py`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from ..sd.attention import CrossFrame, check_cross_frame_mode
from ..sd.loading import StableDiffusion, load, require_sd15
from ..sd.schedulers import DDIM, draw_noise
from ..video_io import load_frames, resize_frames, resized_shape
from .chunks import check_chunking, eps_by_chunks, frame_span
from .fast import FastModes, loop_unet_kwargs
from .sampling import (
    TextConditioning, check_size, checked_latents, ddim_loop, decode_video, encode_prompts, step_counter,
)


def check_instruct_unet(sd: StableDiffusion) -> None:
    """Refuse a model whose UNet does not take the noisy latent ⊕ the source latent (8 channels for SD 1.5)."""
    c_in, c_out = sd.unet.config.in_channels, sd.unet.config.out_channels
    c_source = sd.vae.config.latent_channels
    if c_in != c_out + c_source:
        raise ValueError(
            f"the model's UNet has in_channels={c_in} (variant {sd.config.get('variant', 'unknown')!r}); Video "
            f"Instruct-Pix2Pix needs an InstructPix2Pix UNet with in_channels = {c_out} + {c_source} = "
            f"{c_out + c_source} (noisy latent ⊕ source latent). Convert an InstructPix2Pix checkpoint "
            "(timbrooks/instruct-pix2pix) with `python -m weights_convert` and load that folder"
        )


def source_size(h: int, w: int, resolution: int | None, size_multiple: int, factor: int) -> tuple[int, int]:
    """Step 1's target size for frames h × w: kept when resolution is None and both sides are multiples of the VAE
    factor, else the long side scaled to `resolution` (h or w when None), each side rounded to a multiple of
    `size_multiple` (the authors' `prepare_video` with 64)."""
    if resolution is None:
        if h % factor == 0 and w % factor == 0:
            return h, w
        resolution = max(h, w)
    return resized_shape(h, w, resolution, size_multiple)


def encode_source(sd: StableDiffusion, frames: torch.Tensor) -> torch.Tensor:
    """Step 2: frames (f, H, W, 3) in [0, 1] → E(x) = mode of q(z | x), (f, 4, H/8, W/8) in the UNet's dtype.

    Unscaled (no `scaling_factor`), as InstructPix2Pix was trained and diffusers feeds it. Encoded one frame at a
    time so that memory does not grow with the video's length."""
    images = frames.permute(0, 3, 1, 2).to(sd.device) * 2 - 1  # [0, 1] → [−1, 1]
    return torch.cat([sd.vae.posterior(image[None]).mode() for image in images]).to(sd.dtype)


def branch_contexts(text: TextConditioning) -> torch.Tensor:
    """Step 3: text rows [instruction; negative; negative] (3, n, d), one per branch (T, I), (I), (∅), from the
    instruction's conditioning (`sampling.encode_prompts`, one row, both branches); the UNet shares each row across
    its branch's f frames."""
    return torch.cat([text.text, text.uncond, text.uncond])


def branch_batch(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Step 3: UNet input for the three branches, x_t (f, c, h, w), E(x) (f, c_s, h, w) → (3f, c + c_s, h, w):
    rows [x_t ⊕ E(x); x_t ⊕ E(x); x_t ⊕ 0]."""
    latents = torch.cat([x, x, x])
    sources = torch.cat([source, source, torch.zeros_like(source)])
    return torch.cat([latents, sources], dim=1)


def instruct_guidance(eps: torch.Tensor, guidance_scale: float, image_guidance_scale: float) -> torch.Tensor:
    """Step 4, InstructPix2Pix Eq. 3: ε (3f, c, h, w) in branch order [(T, I); (I); (∅)] →
    ε_∅ + s_T·(ε_{T,I} − ε_I) + s_I·(ε_I − ε_∅), (f, c, h, w)."""
    eps_text_image, eps_image, eps_uncond = eps.chunk(3)
    return (eps_uncond + guidance_scale * (eps_text_image - eps_image)
            + image_guidance_scale * (eps_image - eps_uncond))


class VideoInstructPix2Pix:
    """`pipe = VideoInstructPix2Pix.from_pretrained("models/ip2p")`;
    `frames = pipe("make it Van Gogh's Starry Night style", video="camel.mp4")`."""

    def __init__(self, components: StableDiffusion):
        require_sd15(components, "VideoInstructPix2Pix")
        check_instruct_unet(components)
        self.sd = components

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device="cpu", dtype=torch.float32,
                        lora=None) -> VideoInstructPix2Pix:
        """A converted InstructPix2Pix model folder (`python -m weights_convert`, variant "instruct-pix2pix");
        `lora`: [(file, scale), ...] merged into its weights (`t2vz.load`)."""
        return cls(load(path, device=device, dtype=dtype, lora=lora))

    @torch.no_grad()
    def __call__(
        self,
        instruction: str | None = None,
        video=None,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        num_inference_steps: int = 50,
        negative_prompt: str | None = None,
        num_frames: int | None = None,
        resolution: int | None = None,
        size_multiple: int = 64,
        cross_frame: str = "first",
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
        """Edit `video` by `instruction`: frames (F, H, W, 3) float in [0, 1] on the CPU.

        `video`: a video file, a folder of frames, or frames (F, H, W, 3) (`video_io.load_frames`); its first
        `num_frames` frames (all when None). Size: with `resolution` None, frames whose sides are multiples of the
        VAE factor (8) keep their size, others are scaled with resolution = their long side; otherwise the long side
        becomes `resolution`; each scaled side is rounded to a multiple of `size_multiple` (64 as the authors, 8
        allowed). s_T = `guidance_scale`, s_I = `image_guidance_scale` weigh the instruction and the source frames
        (Eq. 3, module docstring); unlike diffusers, which drops all guidance when s_I < 1, the formula is applied
        for any s_T, s_I ≥ 0. `latents` (F, 4, H/8, W/8) replaces the drawn noise (one draw of that shape from
        `generator`, independent per frame). `callback(i, t, x)` sees the latents after every DDIM step.
        `chunk_size` bounds memory for long videos: the UNet sees at most chunk_size frames of each branch at a
        time (`chunks.py`); with cross_frame "first" or "off" the result equals unchunked editing.
        `merging_*` and `cache_*` are the fast modes (`fast.FastModes`): token merging and feature caching.
        `prompt_embeds` (1, n_tokens, d) replace `instruction` (instruction=None), `negative_prompt_embeds` (same
        shape) the `negative_prompt`, as in diffusers (`sampling.encode_prompts`).
        """
        fast = FastModes(merging_ratio, merging_max_downsample, merging_options, cache_interval,
                         cache_branch).checked(self.sd.unet.config)
        merging = fast.token_merging(generator, self.sd.device)  # forked before the first draw from `generator`
        self.check_inputs(instruction, video, negative_prompt, guidance_scale, image_guidance_scale, num_frames,
                          resolution, size_multiple, cross_frame, chunk_size)
        sd, factor = self.sd, self.sd.vae.downsample_factor
        frames = load_frames(video, "video", max_frames=num_frames)
        f, h, w, _ = frames.shape
        if num_frames is not None and f < num_frames:
            raise ValueError(f"num_frames={num_frames} but the video has only {f} frames; pass num_frames <= {f} "
                             "or None for all of them")
        check_chunking(chunk_size, cross_frame, f)
        height, width = source_size(h, w, resolution, size_multiple, factor)
        check_size(height, width, factor)
        scheduler = DDIM(num_inference_steps, eta=eta)
        context = branch_contexts(encode_prompts(sd, instruction, negative_prompt, True, 1, prompt_embeds,
                                                 negative_prompt_embeds, "instruction", one_prompt=True))

        shape = (f, sd.vae.config.latent_channels, height // factor, width // factor)
        x_T = (draw_noise(shape, generator, sd.device, sd.dtype) if latents is None else checked_latents(
            sd, latents, shape, f" for {f} frames of {height}×{width} (F, latent channels, H/{factor}, W/{factor})"))

        on_step = step_counter(callback)

        source = encode_source(sd, resize_frames(frames, (height, width)))
        x = self.denoise_frames(x_T, source, scheduler, context, guidance_scale, image_guidance_scale, generator,
                                cross_frame, on_step, progress, chunk_size, loop_unet_kwargs(fast.cache, merging))
        return decode_video(sd, x, f)[0]

    def denoise_frames(self, x_T: torch.Tensor, source: torch.Tensor, scheduler: DDIM, context: torch.Tensor,
                       guidance_scale: float, image_guidance_scale: float, generator, cross_frame: str,
                       step_callback=None, progress: bool = True, chunk_size: int | None = None,
                       unet_kwargs: Callable[[list[int]], dict] = lambda ids: {}) -> torch.Tensor:
        """Step 4: DDIM from T to 0 on the f frames, x_T (f, c, h, w) and E(x) (f, c_s, h, w) → x_0 (f, c, h, w),
        with the three-branch guidance of Eq. 3 and cross-frame attention within each branch; the UNet sees at
        most `chunk_size` frames of each branch at a time; `unet_kwargs(ids)`, the fast modes' UNet keywords of the
        chunk of frames `ids` (`fast.loop_unet_kwargs`)."""
        f = x_T.shape[0]
        attention = CrossFrame(f, cross_frame)  # the 3f rows are three videos of f frames: one per branch

        def predict_chunk(x: torch.Tensor, t: torch.Tensor, ids: list[int], frames: CrossFrame) -> torch.Tensor:
            eps = self.sd.unet(branch_batch(x, source[frame_span(ids)]), t, context, cross_frame=frames,
                               **unet_kwargs(ids))  # a view of E(x): no index tensor to the device per step
            return instruct_guidance(eps, guidance_scale, image_guidance_scale)

        return ddim_loop(x_T, scheduler, scheduler.timesteps, eps_by_chunks(predict_chunk, attention, chunk_size),
                         generator, step_callback, f"DDIM (Instruct-Pix2Pix, {f} frames)", progress)

    def check_inputs(self, instruction, video, negative_prompt, guidance_scale, image_guidance_scale, num_frames,
                     resolution, size_multiple, cross_frame, chunk_size) -> None:
        if video is None:
            raise ValueError("no video: give video=, the frames to edit (a video file, a folder of frames, or "
                             "frames (F, H, W, 3))")
        if instruction is not None and not isinstance(instruction, str):
            raise ValueError(f"instruction must be one string (the edit, e.g. 'make it snowy'), got {instruction!r}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {negative_prompt!r}")
        for name, value in (("guidance_scale", guidance_scale), ("image_guidance_scale", image_guidance_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a finite number >= 0 (InstructPix2Pix: 7.5 and 1.5)")
        for name, value, least in (("num_frames", num_frames, 1), ("resolution", resolution, 1),
                                   ("chunk_size", chunk_size, 2)):
            if value is not None and (isinstance(value, bool) or int(value) != value or value < least):
                raise ValueError(f"{name}={value!r} must be an integer >= {least} or None")
        factor = self.sd.vae.downsample_factor
        if isinstance(size_multiple, bool) or int(size_multiple) != size_multiple or size_multiple < factor \
                or size_multiple % factor:
            raise ValueError(f"size_multiple={size_multiple!r} must be a positive multiple of {factor} (the VAE "
                             "downsamples by it); 64 as the authors, or 8")
        check_cross_frame_mode(cross_frame)

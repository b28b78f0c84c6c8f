"""Train the toy model: t2vz's own SD 1.5 classes in small configurations, on the toy world, in stages.

    1. data   render `data.num_images` captioned scenes (`world.scene_for_index`), held-out combinations excluded
    2. vae    the KL autoencoder: ‖D(z) − x‖² + β·KL(q(z|x) ‖ N(0, I)), z ~ q(z|x) (Rombach et al. 2022, Sec. 3,
              without the perceptual and adversarial terms, which flat-colour scenes do not need)
    3. unet   the UNet and the CLIP text transformer together on ε-prediction, L = ‖ε − ε_θ(√ᾱ_t z₀ + √(1−ᾱ_t) ε,
              t, τ(y))‖² (Ho et al. 2020, Eq. 14; LDM Eq. 2), with the caption replaced by "" with probability
              `unet.caption_dropout` so that one network gives both branches of classifier-free guidance
              (Ho & Salimans 2022); an exponential moving average of the weights is what ships
    3b. grow  optional (`unet.grow.steps` > 0; the shipped recipe has none): add transformer blocks at the levels
              `unet.grow.levels` marks, their output projections zeroed so that the model starts as stage 3
              ended, and train every weight on (an experiment: attention at 16×16 for the last steps only,
              docs/toy_model.md)
    4. export the EMA weights as fp16 safetensors in a t2vz model folder (`model_folder.write_model_folder`, the
              same format `weights_convert` writes for SD 1.5), with the command and seed that made them

Each stage checkpoints into `workdir` (atomically, every `checkpoint_every` steps) and a re-run resumes where the
last one stopped. Entry point: `experiments/train_toyworld.py`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..experiment.tracking import LoggerConfig, Tracker
from ..sd.attention import Transformer2D
from ..sd.model_folder import write_model_folder
from ..sd.schedulers.noise_schedule import scaled_linear_alphas_cumprod
from ..sd.text_encoder import MAX_TOKENS, build_clip_text_model, canonical_clip_state_dict, load_tokenizer
from ..sd.text_encoder import shipped_tokenizer_dir
from ..sd.unet import UNet, UNetConfig
from ..sd.vae import AutoencoderKL, VAEConfig
from .world import SIZE, render, scene_for_index


@dataclass
class DataConfig:
    num_images: int = 20000
    seed: int = 0  # the dataset: scene i is scene_for_index(seed, i)


@dataclass
class VAETrainConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # 3 levels: 64×64 → 16×16
    layers_per_block: int = 1
    norm_num_groups: int = 8
    steps: int = 800
    batch_size: int = 16
    lr: float = 1e-3  # peak; linear warm-up over 100 steps, then cosine decay to 0 at `steps`
    kl_weight: float = 1e-4


@dataclass
class GrowConfig:
    """Stage 3b: after `unet.steps`, give the UNet transformer blocks at the levels `levels` marks (those it lacks),
    their output projections zero-initialised so the grown model starts as the stage-3 EMA model ended, and train
    every weight `steps` more steps. 0 steps: no growth, the UNet keeps `unet.attention_levels`."""

    levels: list[bool] = field(default_factory=lambda: [False, False, False])  # 16×16, 8×8, 4×4
    steps: int = 0
    lr: float = 2e-4  # peak; linear warm-up over `warmup` steps, then cosine decay to 0
    warmup: int = 50


@dataclass
class UNetTrainConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    # Transformer blocks at 8×8 and 4×4, none at 16×16: there they took 44% of a training step (0.43 against
    # 0.24 s at batch 32, 2-core CPU), and without them 8000 steps fit about the hour and draw the shapes
    # (docs/toy_model.md).
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])  # 16×16, 8×8, 4×4
    layers_per_block: int = 1
    num_attention_heads: int = 4
    norm_num_groups: int = 8
    steps: int = 8000  # colour and shape right in 76.6% of the judge's images at 7000, 89.8% at 8000 (docs/toy_model.md)
    batch_size: int = 32
    lr: float = 1e-3  # peak; linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`
    warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    snr_gamma: float = 5.0  # Min-SNR-γ loss weight min(SNR_t, γ)/SNR_t (Hang et al. 2023); 0 weighs every t as 1
    grow: GrowConfig = field(default_factory=GrowConfig)


@dataclass
class TextTrainConfig:
    """A small CLIP text transformer (transformers' CLIPTextModel), trained with the UNet from scratch."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2


@dataclass
class TrainConfig:
    workdir: str = "runs/toyworld"  # checkpoints and the cached dataset; re-running resumes from here
    out: str = "t2vz/data/models/toyworld"  # the exported model folder
    seed: int = 0
    threads: int = 0  # torch.set_num_threads; 0 leaves PyTorch's default (all cores)
    checkpoint_every: int = 500
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    unet: UNetTrainConfig = field(default_factory=UNetTrainConfig)
    text: TextTrainConfig = field(default_factory=TextTrainConfig)
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(mode="offline"))
    progress: bool = True


def text_config(cfg: TextTrainConfig) -> dict:
    """CLIPTextConfig kwargs, as a model folder stores them: the shipped tokenizer's 49408 tokens, 77 positions."""
    return dict(vocab_size=49408, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                projection_dim=cfg.hidden_size)


def vae_config(cfg: VAETrainConfig, scaling_factor: float = 1.0) -> VAEConfig:
    return VAEConfig(block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                     norm_num_groups=cfg.norm_num_groups, scaling_factor=scaling_factor)


def grown_levels(cfg: UNetTrainConfig) -> list[bool]:
    """The attention levels after stage 3b: stage 3's, plus those `grow.levels` adds when it trains any steps."""
    if len(cfg.grow.levels) != len(cfg.attention_levels):
        raise ValueError(f"unet.grow.levels {cfg.grow.levels} needs one entry per level of unet.attention_levels "
                         f"{cfg.attention_levels}")
    if cfg.grow.steps <= 0:
        return list(cfg.attention_levels)
    return [a or g for a, g in zip(cfg.attention_levels, cfg.grow.levels)]


def unet_config(cfg: UNetTrainConfig, context_dim: int, levels: list[bool] | None = None) -> UNetConfig:
    """The UNet of stage 3, or the same with attention at `levels` (`grown_levels`: the one exported)."""
    levels = cfg.attention_levels if levels is None else levels
    return UNetConfig(block_out_channels=tuple(cfg.block_out_channels), attention_levels=tuple(levels),
                      layers_per_block=cfg.layers_per_block, num_attention_heads=cfg.num_attention_heads,
                      cross_attention_dim=context_dim, norm_num_groups=cfg.norm_num_groups)


# ---- checkpoints -----------------------------------------------------------------------------------------------

def save_atomic(obj: dict, path: Path) -> None:
    """torch.save into a sibling temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    """A stage's checkpoint (plain tensors and numbers only: weights_only=True), or None when there is none."""
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


# ---- stage 1: data ---------------------------------------------------------------------------------------------

def dataset_key(cfg: DataConfig) -> str:
    """A name for the dataset `cfg` draws from the world as the code now renders it: seed, size and a hash of its
    first scenes. Caches and checkpoints carry it, so a change to the world is never trained on stale data."""
    digest = hashlib.sha1()
    for i in range(8):
        scene = scene_for_index(cfg.seed, i)
        digest.update(render(scene).tobytes())
        digest.update(scene.caption.encode())
    return f"{cfg.seed}_{cfg.num_images}_{digest.hexdigest()[:10]}"


def check_same_data(state: dict, path: Path, key: str) -> None:
    """Refuse to resume a checkpoint made on another dataset (another world, seed or size)."""
    if state.get("data") != key:
        raise ValueError(f"{path} was trained on another dataset ({state.get('data') or 'an older world'}; now "
                         f"{key}): the world or the data settings changed since. Train in a new workdir=..., or "
                         f"delete {path.parent} to start again")


def build_dataset(cfg: DataConfig, workdir: Path, key: str, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """Render (or read the cached) images (n, 64, 64, 3) uint8 and their captions; `key` is `dataset_key(cfg)`."""
    cache = workdir / f"data_{key}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return f["images"], [str(c) for c in f["captions"]]
    images = np.empty((cfg.num_images, SIZE, SIZE, 3), np.uint8)
    captions = []
    for i in tqdm(range(cfg.num_images), desc="rendering the toy world", disable=not progress):
        scene = scene_for_index(cfg.seed, i)
        images[i] = render(scene)
        captions.append(scene.caption)
    tmp = cache.with_name(f".{cache.stem}.partial.npz")
    np.savez(tmp, images=images, captions=np.array(captions))
    os.replace(tmp, cache)
    return images, captions


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """(n, h, w, 3) uint8 → (n, 3, h, w) float in [−1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to 0 at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def min_snr_weight(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-timestep weight of the ε-prediction loss, min(SNR_t, γ) / SNR_t with SNR_t = ᾱ_t / (1 − ᾱ_t)
    (Min-SNR-γ, Hang et al. 2023, Eq. 7 for ε): the nearly clean timesteps, whose loss is about fine detail, stop
    dominating the gradient, and the steps that lay out shapes get a larger share. γ = 0 gives 1 everywhere."""
    if gamma <= 0:
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr


# ---- stage 2: the autoencoder -----------------------------------------------------------------------------------

def train_vae(cfg: TrainConfig, images: np.ndarray, data: str, workdir: Path, tracker: Tracker) -> AutoencoderKL:
    """Stage 2 on the dataset named `data` (`dataset_key`). Returns the trained VAE (fp32, eval mode) with
    `scaling_factor` still 1 (set by `latent_scale`)."""
    path = workdir / "vae.pt"
    torch.manual_seed(cfg.seed * 1000 + 1)  # the init and the posterior noise
    vae = AutoencoderKL(vae_config(cfg.vae))
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae.lr, weight_decay=0.0, fused=True)
    state = load_checkpoint(path)
    step = 0
    if state is not None:
        check_same_data(state, path, data)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        torch.set_rng_state(state["rng"])  # the posterior noise goes on where the interrupted run stopped
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    for _ in range(step):  # replay the batch draws, so a resumed run sees the batches an unbroken one would
        torch.randint(len(images), (cfg.vae.batch_size,), generator=gen)
    bar = tqdm(total=cfg.vae.steps, initial=step, desc="training the VAE", disable=not cfg.progress)
    vae.train()
    while step < cfg.vae.steps:
        x = to_model_range(images[torch.randint(len(images), (cfg.vae.batch_size,), generator=gen).numpy()])
        posterior = vae.posterior(x)
        recon = vae.decode(posterior.sample())
        rec = F.mse_loss(recon, x)
        kl = 0.5 * (posterior.mean ** 2 + posterior.logvar.exp() - 1.0 - posterior.logvar).mean()
        loss = rec + cfg.vae.kl_weight * kl
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.vae.lr, 100, cfg.vae.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
        if step % 50 == 0:
            tracker.log_metrics({"vae/reconstruction_mse": rec.item(), "vae/kl": kl.item(), "vae/step": step})
        if step % cfg.checkpoint_every == 0 or step == cfg.vae.steps:
            save_atomic({"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "rng": torch.get_rng_state(), "data": data}, path)
    bar.close()
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: np.ndarray, data: str, workdir: Path, vae_step: int, progress: bool
                   ) -> torch.Tensor:
    """The posterior means of every image, unscaled (n, 4, 16, 16), cached in `workdir` for the VAE of `vae_step`
    and the dataset named `data` (`dataset_key`)."""
    cache = workdir / "latents.pt"
    state = load_checkpoint(cache)
    if state is not None and state["n"] == len(images) and state.get("vae_step") == vae_step \
            and state.get("data") == data:
        return state["latents"]
    out = []
    for i in tqdm(range(0, len(images), 256), desc="encoding the dataset", disable=not progress):
        out.append(vae.encode(to_model_range(images[i:i + 256])))
    latents = torch.cat(out)
    save_atomic({"latents": latents, "n": len(images), "vae_step": vae_step, "data": data}, cache)
    return latents


def latent_scale(latents: torch.Tensor) -> float:
    """1 / std of the latents, so that the diffusion model sees unit variance (LDM Sec. 4.3.2; SD 1.5: 0.18215)."""
    return float(1.0 / latents.float().std())


# ---- stage 3: UNet and text encoder -------------------------------------------------------------------------------

class Denoiser(torch.nn.Module):
    """The UNet and the text transformer as one module, so that one optimiser, EMA and checkpoint serve both."""

    def __init__(self, unet: UNet, clip):
        super().__init__()
        self.unet, self.clip = unet, clip

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x_t (b, 4, h, w), t (b,), token ids (b, 77) → predicted ε (b, 4, h, w)."""
        return self.unet(x_t, t, self.clip(ids).last_hidden_state)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_ema ← d·θ_ema + (1 − d)·θ, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def grow_from(model: Denoiser, start: Denoiser) -> list[str]:
    """Load `start`'s weights into `model`, which has transformer blocks `start` lacks (stage 3b), and zero those
    blocks' output projections: each is then the identity (Transformer2D adds its output to its input), so the
    grown model computes what `start` did. Returns the names of the new blocks."""
    missing, unexpected = model.load_state_dict(start.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"the grown UNet has no place for {len(unexpected)} of the trained weights, e.g. "
                         f"{unexpected[0]!r}: grow.levels may only add attention levels")
    new = [name for name, module in model.named_modules() if isinstance(module, Transformer2D)
           and any(key.startswith(name + ".") for key in missing)]
    unexplained = [key for key in missing if not any(key.startswith(name + ".") for name in new)]
    if unexplained:
        raise ValueError(f"weights missing outside the new transformer blocks, e.g. {unexplained[0]!r}")
    with torch.no_grad():
        for name in new:
            proj_out = model.get_submodule(name).proj_out
            proj_out.weight.zero_()
            proj_out.bias.zero_()
    return new


def train_unet(cfg: TrainConfig, latents: torch.Tensor, captions: list[str], data: str, workdir: Path,
               tracker: Tracker, vae_step: int, start: Denoiser | None = None) -> Denoiser:
    """Stage 3 on scaled latents (n, 4, h, w) of the dataset named `data`, encoded by the VAE trained for
    `vae_step` steps; or, given `start` (stage 3's EMA model), stage 3b: `start` grown to `grown_levels` and
    trained `unet.grow.steps` more. Returns the EMA model (fp32, eval mode). A checkpoint made on another dataset
    or another VAE's latents is refused rather than resumed."""
    grow = start is not None
    if grow:
        path, levels, name = workdir / "unet_grown.pt", grown_levels(cfg.unet), "growing the UNet's attention"
        steps, peak, warmup, seed = cfg.unet.grow.steps, cfg.unet.grow.lr, cfg.unet.grow.warmup, cfg.seed * 1000 + 5
    else:
        path, levels, name = workdir / "unet.pt", cfg.unet.attention_levels, "training the UNet + text encoder"
        steps, peak, warmup, seed = cfg.unet.steps, cfg.unet.lr, cfg.unet.warmup, cfg.seed * 1000 + 3
    torch.manual_seed(seed)
    text_cfg = text_config(cfg.text)
    model = Denoiser(UNet(unet_config(cfg.unet, text_cfg["hidden_size"], levels)), build_clip_text_model(text_cfg))
    if grow:
        grow_from(model, start)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.0, fused=True)
    step = 0
    state = load_checkpoint(path)
    if state is not None:
        check_same_data(state, path, data)
        if state.get("vae_step", vae_step) != vae_step:
            raise ValueError(f"{path} was trained on the latents of the VAE after {state['vae_step']} steps, but the "
                             f"VAE now has {vae_step}; delete {path} to train the UNet again on the new latents")
        if grow and state.get("start_step") != cfg.unet.steps:
            raise ValueError(f"{path} grew the UNet of stage 3 after {state.get('start_step')} steps, but stage 3 "
                             f"now has {cfg.unet.steps}; delete {path} to grow it again")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
    tokenizer = load_tokenizer()
    ids = torch.cat([tokenizer(captions[i:i + 1024], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                               return_tensors="pt").input_ids for i in range(0, len(captions), 1024)])
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    alphas_cumprod = scaled_linear_alphas_cumprod()[2]
    weights = min_snr_weight(alphas_cumprod, cfg.unet.snr_gamma)
    gen = torch.Generator().manual_seed(seed + 1)
    b = cfg.unet.batch_size

    def draw():
        """One batch's randomness, from `gen` only (so a resumed run can replay it)."""
        idx = torch.randint(len(latents), (b,), generator=gen)
        drop = torch.rand(b, generator=gen) < cfg.unet.caption_dropout
        t = torch.randint(len(alphas_cumprod), (b,), generator=gen)
        eps = torch.randn((b, *latents.shape[1:]), generator=gen)
        return idx, drop, t, eps

    for _ in range(step):
        draw()
    bar = tqdm(total=steps, initial=step, desc=name, disable=not cfg.progress)
    model.train()
    while step < steps:
        idx, drop, t, eps = draw()
        z0 = latents[idx]
        batch_ids = torch.where(drop[:, None], empty, ids[idx])
        ab = alphas_cumprod[t][:, None, None, None]
        x_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps  # q(x_t | x_0), DDPM Eq. 4
        per_sample = (model(x_t, t, batch_ids) - eps).pow(2).mean(dim=(1, 2, 3))
        loss = (weights[t] * per_sample).mean()  # ‖ε − ε_θ‖², weighted by Min-SNR-γ
        for g in opt.param_groups:
            g["lr"] = lr_at(step, peak, warmup, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, cfg.unet.ema_decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 50 == 0:
            prefix = "unet_grow" if grow else "unet"
            tracker.log_metrics({f"{prefix}/loss": loss.item(), f"{prefix}/step": step})
        if step % cfg.checkpoint_every == 0 or step == steps:
            save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                         "step": step, "vae_step": vae_step, "data": data,
                         **({"start_step": cfg.unet.steps} if grow else {})}, path)
    bar.close()
    return ema.eval()


# ---- stage 4: export --------------------------------------------------------------------------------------------

# The motion settings the model folder carries as its defaults (`model_folder.method_defaults`): λ = 32 is one
# latent pixel (4 image pixels) a frame on 16×16 latents; the toy model lays out its scene late and follows a warp
# the better the later it comes: warped at DDIM step 8 (of 50, counted from the end) its mean error is 0.67 px a
# frame, at 15 1.33 px (the judge, λ = 32 and 64); an earlier toy model composed a new scene in every frame at the
# paper's 44 → 47 (docs/toy_model.md, "Motion").
TOY_METHOD = {"motion_strength": 32.0, "t0": 8, "t1": 8}


def fp16(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in state_dict.items()}


def export(cfg: TrainConfig, vae: AutoencoderKL, scale: float, denoiser: Denoiser, recipe: dict) -> Path:
    """Write the model folder `cfg.out`: fp16 weights, the configs, and `recipe` (command, seed, settings, times)."""
    text_cfg = text_config(cfg.text)
    config = {
        "unet": dataclasses.asdict(unet_config(cfg.unet, text_cfg["hidden_size"], grown_levels(cfg.unet))),
        "vae": dataclasses.asdict(vae_config(cfg.vae, scale)),
        "text_encoder": text_cfg,
        "source": {"layout": "toyworld", **recipe},
        "variant": "toyworld",
        "sample_size": SIZE,
        "method": dict(TOY_METHOD),
    }
    state_dicts = {"unet": fp16(denoiser.unet.state_dict()), "vae": fp16(vae.state_dict()),
                   "text_encoder": fp16(canonical_clip_state_dict(denoiser.clip.state_dict()))}
    return write_model_folder(cfg.out, state_dicts, config, shipped_tokenizer_dir(), overwrite=True)


def train(cfg: TrainConfig, command: str, config_yaml: str) -> Path:
    """All stages (3b where `unet.grow.steps` > 0); returns the exported model folder."""
    grown_levels(cfg.unet)  # a bad unet.grow is refused now, not after an hour of stages 1–3
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    timings = {}
    with Tracker(cfg.logger, workdir, dataclasses.asdict(cfg), name="train_toyworld", job_type="train") as tracker:
        data = dataset_key(cfg.data)
        images, captions = build_dataset(cfg.data, workdir, data, cfg.progress)
        timings["data_s"] = round(time.time() - start, 1)
        vae = train_vae(cfg, images, data, workdir, tracker)
        timings["vae_s"] = round(time.time() - start - sum(timings.values()), 1)
        latents = encode_dataset(vae, images, data, workdir, cfg.vae.steps, cfg.progress)
        scale = latent_scale(latents)
        scaled = latents * scale
        denoiser = train_unet(cfg, scaled, captions, data, workdir, tracker, cfg.vae.steps)
        timings["unet_s"] = round(time.time() - start - sum(timings.values()), 1)
        if cfg.unet.grow.steps > 0:
            denoiser = train_unet(cfg, scaled, captions, data, workdir, tracker, cfg.vae.steps, denoiser)
            timings["grow_s"] = round(time.time() - start - sum(timings.values()), 1)
        recipe = {"command": command, "seed": cfg.seed, "config": config_yaml, "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "seconds_this_run": timings, "python": sys.version.split()[0]}
        out = export(cfg, vae, scale, denoiser, recipe)
        tracker.log_metrics({"latent_scale": scale, **{f"time/{k}": v for k, v in timings.items()}})
    return out

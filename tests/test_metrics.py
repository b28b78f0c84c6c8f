"""t2vz.experiment.metrics: CLIP scores against a hand computation (and against torchmetrics: test_clip_score.py) on a tiny random CLIPModel; phase correlation, warp error
and frame difference on synthetic videos with known motion."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_clip_config
from transformers import CLIPModel

from t2vz.experiment.metrics import (CLIP_MEAN, CLIP_STD, ClipScorer, frame_difference, global_translation, measured_motion,
                          video_metrics, warp_error)
from t2vz.sd.text_encoder import load_tokenizer

PROMPT = "a horse galloping on a street"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel saved without a tokenizer (the scorer falls back to t2vz's shipped one)."""
    torch.manual_seed(0)
    config = tiny_clip_config()
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer.from_pretrained(clip_dir)


def texture(h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """A smooth periodic random RGB texture (h, w, 3) in [0, 1]: white noise low-passed in the Fourier domain."""
    noise = torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64), torch.fft.rfftfreq(w, dtype=torch.float64)
    lowpass = torch.exp(-(fy[:, None] ** 2 + fx[None, :] ** 2) / (2 * 0.08 ** 2))
    smooth = torch.fft.irfft2(torch.fft.rfft2(noise) * lowpass, s=(h, w))
    smooth = (smooth - smooth.amin()) / (smooth.amax() - smooth.amin())
    return smooth.permute(1, 2, 0).float()


def fourier_shift(image: torch.Tensor, dy: float, dx: float) -> torch.Tensor:
    """(h, w, 3) → image(y − dy, x − dx), periodic, by a phase ramp: exact for fractional shifts."""
    h, w = image.shape[:2]
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64), torch.fft.fftfreq(w, dtype=torch.float64)
    ramp = torch.exp(-2j * math.pi * (fy[:, None] * dy + fx[None, :] * dx))
    spectrum = torch.fft.fft2(image.double().permute(2, 0, 1))
    return torch.fft.ifft2(spectrum * ramp).real.permute(1, 2, 0).float()


# ---- CLIP ------------------------------------------------------------------------------------------------

def test_from_pretrained_records_name_and_falls_back_to_shipped_tokenizer(scorer, clip_dir):
    assert scorer.name == str(clip_dir)
    assert scorer.image_size == 32
    assert scorer.tokenizer.get_vocab() == load_tokenizer().get_vocab()


def test_from_pretrained_prefers_the_folders_own_tokenizer(clip_dir, tmp_path):
    folder = tmp_path / "clip_with_tokenizer"
    CLIPModel.from_pretrained(clip_dir).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    assert ClipScorer.from_pretrained(folder).tokenizer.name_or_path == str(folder)


def test_preprocess_normalises_with_clip_mean_std(scorer):
    frames = torch.full((2, 48, 40, 3), 0.3)  # portrait: resize to 38 × 32 (int(32·48/40)), crop 32 × 32
    pixels = scorer.preprocess(frames)
    assert pixels.shape == (2, 3, 32, 32)
    level = round(0.3 * 255) / 255  # scored as the uint8 picture
    expected = (level - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(pixels, expected.view(1, 3, 1, 1).expand(2, 3, 32, 32), rtol=1e-5, atol=1e-5)


def test_preprocess_center_crops_without_resampling_at_the_model_size(scorer):
    # already 32 pixels high: no resampling, the crop takes the middle columns exactly
    ramp = (torch.arange(64) / 255).view(1, 1, 64, 1).expand(1, 32, 64, 3)
    cropped = scorer.preprocess(ramp)[0, 0] * CLIP_STD[0] + CLIP_MEAN[0]
    torch.testing.assert_close(cropped, ramp[0, :, 16:48, 0], rtol=1e-5, atol=1e-6)


def test_clip_score_matches_hand_computation(scorer):
    frames = torch.rand(3, 40, 40, 3, generator=torch.Generator().manual_seed(2))
    model = scorer.model
    with torch.no_grad():
        ids = load_tokenizer()([PROMPT], return_tensors="pt").input_ids
        text = model.get_text_features(input_ids=ids).pooler_output
        image = model.get_image_features(pixel_values=scorer.preprocess(frames)).pooler_output
    mean = 100 * F.cosine_similarity(image, text.expand_as(image), dim=-1).mean().item()
    assert scorer.frame_scores(frames, PROMPT).mean().item() == pytest.approx(mean, rel=1e-5, abs=1e-5)
    assert scorer.clip_score(frames, PROMPT) == pytest.approx(max(mean, 0.0), rel=1e-5, abs=1e-5)
    assert scorer.image_embeddings(frames).shape == (3, 16)
    assert scorer.text_embeddings([PROMPT, "a cat"]).norm(dim=-1).allclose(torch.ones(2))


def test_embeddings_are_batched_consistently(scorer, monkeypatch):
    frames = torch.rand(5, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    whole = scorer.image_embeddings(frames)
    monkeypatch.setattr(scorer, "batch_size", 2)
    torch.testing.assert_close(scorer.image_embeddings(frames), whole, rtol=1e-5, atol=1e-6)


def test_frame_consistency_identical_frames_is_one(scorer):
    frames = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(4)).expand(4, -1, -1, -1)
    consistency = scorer.frame_consistency(frames)
    assert consistency["frame_consistency"] == pytest.approx(100.0, abs=1e-3)
    assert consistency["frame_consistency_consecutive"] == pytest.approx(100.0, abs=1e-3)


def test_frame_consistency_all_pairs_differs_from_consecutive(scorer):
    a, b = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(5))
    frames = torch.stack([a, b, a])  # consecutive: (A,B), (B,A); all pairs adds (A,A)
    ea, eb = scorer.image_embeddings(torch.stack([a, b]))
    cos_ab = (ea @ eb).item()
    consistency = scorer.frame_consistency(frames)
    assert consistency["frame_consistency_consecutive"] == pytest.approx(100 * cos_ab, abs=1e-3)
    assert consistency["frame_consistency"] == pytest.approx(100 * (2 * cos_ab + 1) / 3, abs=1e-3)
    assert cos_ab < 0.999  # so the two definitions really differ here


def test_frame_consistency_single_frame_is_nan(scorer):
    consistency = scorer.frame_consistency(torch.rand(1, 32, 32, 3))
    assert all(math.isnan(v) for v in consistency.values())


def test_bad_frame_layout_is_explained(scorer):
    with pytest.raises(ValueError, match=r"\(f, h, w, 3\).*permute"):
        scorer.image_embeddings(torch.rand(2, 3, 32, 32))


# ---- model-free temporal metrics ---------------------------------------------------------------------------

def test_phase_correlation_integer_shift():
    a = texture()
    dy, dx = global_translation(a, torch.roll(a, shifts=(3, -5), dims=(0, 1)))
    assert dy == pytest.approx(3, abs=0.1) and dx == pytest.approx(-5, abs=0.1)


@pytest.mark.parametrize("shift", [(2.5, -1.5), (0.0, 2.5), (-1.3, 4.7), (0.25, 0.75)])
def test_phase_correlation_subpixel_shift(shift):
    a = texture(seed=1)
    dy, dx = global_translation(a, fourier_shift(a, *shift))
    assert dy == pytest.approx(shift[0], abs=0.2) and dx == pytest.approx(shift[1], abs=0.2)


def test_sign_convention_square_moving_right_is_positive_dx():
    a, b = torch.zeros(2, 48, 48, 3)
    a[18:30, 14:26] = 1.0
    b[18:30, 18:30] = 1.0  # same square, 4 px to the right
    dy, dx = global_translation(a, b)
    assert dx == pytest.approx(4, abs=0.25) and dy == pytest.approx(0, abs=0.25)
    assert global_translation(b, a)[1] == pytest.approx(-4, abs=0.25)


def test_measured_motion_per_consecutive_pair():
    a = texture(seed=2)
    frames = torch.stack([torch.roll(a, shifts=(0, 2 * k), dims=(0, 1)) for k in range(4)])
    motion = measured_motion(frames)
    assert motion.shape == (3, 2)
    torch.testing.assert_close(motion, torch.tensor([[0.0, 2.0]] * 3), atol=0.1, rtol=0)


def test_warp_error_vanishes_for_pure_translation_unlike_frame_difference():
    a = texture(seed=3)
    frames = torch.stack([torch.roll(a, shifts=(-k, 3 * k), dims=(0, 1)) for k in range(4)])
    assert warp_error(frames) < 1e-6
    assert frame_difference(frames) > 0.05


def test_static_video_has_zero_warp_error_and_frame_difference():
    frames = texture(seed=4).expand(3, -1, -1, -1)
    assert warp_error(frames) == 0.0
    assert frame_difference(frames) == 0.0


def test_video_metrics_keys_with_and_without_scorer(scorer):
    frames = torch.stack([torch.roll(texture(32, 48, seed=5), shifts=(0, k), dims=(0, 1)) for k in range(3)])
    temporal = {"warp_error", "flow_warp_error", "frame_difference", "motion_dx_mean", "motion_dy_mean"}
    clip = {"clip_score", "frame_consistency", "frame_consistency_consecutive"}
    without = video_metrics(frames, PROMPT, None)
    assert set(without) == temporal
    assert without["motion_dx_mean"] == pytest.approx(1.0, abs=0.1)
    with_clip = video_metrics(frames, PROMPT, scorer)
    assert set(with_clip) == temporal | clip
    assert all(isinstance(v, float) and math.isfinite(v) for v in with_clip.values())

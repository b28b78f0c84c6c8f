"""The CLIP score is the one the field cites: equal to torchmetrics' `CLIPScore` (the test-only oracle) on the same
frames and prompt, with a random-weight CLIPModel saved to a local folder; textual faithfulness and frame
consistency against their closed forms on embeddings chosen by hand.

torchmetrics 1.9 reads `get_image_features(...)` / `get_text_features(...)` as tensors, which transformers 5 returns
inside output objects: `TensorFeatures` hands it the same model's pooled tensors, nothing else changes. Tolerance:
rtol 1e-6, atol 1e-5 on a score of scale 100, fp32 (measured: equal to the last bit; resizing with torch's
antialiased bicubic instead of PIL's moves a 48 × 40 video's score by 5e-3)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_clip_config
from transformers import CLIPModel

from t2vz.experiment.metrics import ClipScorer, clip_image_processor
from t2vz.sd.text_encoder import load_tokenizer
from t2vz.video_io import to_uint8

torchmetrics = pytest.importorskip("torchmetrics.multimodal.clip_score")

PROMPTS = ["a red circle on grass", "a horse galloping on a street, cinematic, 4k, highly detailed"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random-weight CLIPModel with its preprocessor_config.json (CLIP's 224-pixel transform scaled to 32).

    Two random towers give embeddings at random angles, whose mean cosine is as often negative, which both scores
    clamp to 0. So both towers' last LayerNorm get one shared bias and both projections the same matrix: the
    embeddings share a component and the cosines are positive (about 0.3–0.7), varying with the frames and text."""
    torch.manual_seed(0)
    config = tiny_clip_config()
    model = CLIPModel(config)
    with torch.no_grad():
        shared = torch.randn(32)
        model.vision_model.post_layernorm.bias.copy_(shared)
        model.text_model.final_layer_norm.bias.copy_(shared)
        model.visual_projection.weight.copy_(model.text_projection.weight)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    clip_image_processor(None, 32).save_pretrained(folder)
    return folder


class TensorFeatures(torch.nn.Module):
    """The CLIPModel as torchmetrics 1.9 expects it: get_*_features return the pooled, projected tensors."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def torchmetrics_score(clip_dir, frames: torch.Tensor, prompt: str) -> float:
    """torchmetrics' CLIPScore of a video: updated with its f frames (uint8, (3, h, w)), each with the prompt."""
    from transformers import CLIPProcessor

    def model_and_processor():
        model = CLIPModel.from_pretrained(clip_dir).eval()
        processor = CLIPProcessor(image_processor=clip_image_processor(clip_dir, 32), tokenizer=load_tokenizer())
        return TensorFeatures(model), processor

    metric = torchmetrics.CLIPScore(model_name_or_path=model_and_processor)
    pictures = torch.from_numpy(to_uint8(frames)).permute(0, 3, 1, 2)
    with torch.no_grad():
        metric.update(list(pictures), [prompt] * len(pictures))
    return metric.compute().item()


def video(seed: int, h: int, w: int, f: int = 4) -> torch.Tensor:
    return torch.rand(f, h, w, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [(32, 32), (48, 40), (64, 96)])  # the model's size; portrait; landscape (resized)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_clip_score_equals_torchmetrics(clip_dir, size, prompt):
    scorer = ClipScorer.from_pretrained(clip_dir)
    frames = video(sum(size), *size)
    ours = scorer.clip_score(frames, prompt)
    assert 10 < ours < 90  # not clamped: the comparison is of the scores themselves
    reference = torchmetrics_score(clip_dir, frames, prompt)
    assert ours == pytest.approx(reference, rel=1e-6, abs=1e-5)


def test_a_negative_mean_is_clamped_to_zero_as_torchmetrics_does(clip_dir):
    """With the text projection negated every cosine flips sign: both give exactly 0, not the negative mean."""
    folder = clip_dir.parent / "clip_negated"
    model = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    clip_image_processor(clip_dir, 32).save_pretrained(folder)
    scorer = ClipScorer.from_pretrained(folder)
    frames = video(3, 32, 32, f=2)
    assert scorer.frame_scores(frames, PROMPTS[0]).mean() < -10
    assert scorer.clip_score(frames, PROMPTS[0]) == 0.0
    assert torchmetrics_score(folder, frames, PROMPTS[0]) == 0.0


def test_frames_are_scored_as_uint8_pictures(clip_dir):
    """A float frame and its uint8 rounding score the same (the written video is what is scored)."""
    scorer = ClipScorer.from_pretrained(clip_dir)
    frames = video(7, 32, 32)
    rounded = torch.from_numpy(to_uint8(frames)).float() / 255
    assert scorer.clip_score(frames, PROMPTS[0]) == scorer.clip_score(rounded, PROMPTS[0])


class FixedEmbeddings(ClipScorer):
    """A scorer whose embeddings are given: the closed forms need no network."""

    def __init__(self, images: torch.Tensor, text: torch.Tensor):
        self.images, self.text = images, text

    def image_embeddings(self, frames):
        return torch.nn.functional.normalize(self.images, dim=-1)

    def text_embeddings(self, prompts):
        return torch.nn.functional.normalize(self.text, dim=-1)


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_textual_faithfulness_closed_form():
    """Frames at 0°, 60°, 90° from the prompt: 100 · (1 + 1/2 + 0) / 3."""
    scorer = FixedEmbeddings(torch.tensor([unit(0), unit(60), unit(90)]), torch.tensor([unit(0)]))
    frames = torch.zeros(3, 8, 8, 3)
    assert scorer.textual_faithfulness(frames, "edited") == pytest.approx(50.0, abs=1e-4)
    assert scorer.frame_scores(frames, "edited").tolist() == pytest.approx([100.0, 50.0, 0.0], abs=1e-4)
    # all frames facing away from the prompt (120°, 180°): the mean is negative, the score is 0
    away = FixedEmbeddings(torch.tensor([unit(120), unit(180)]), torch.tensor([unit(0)]))
    assert away.textual_faithfulness(torch.zeros(2, 8, 8, 3), "edited") == 0.0


def test_frame_consistency_closed_form():
    """Frames at 0°, 60°, 90°: pairs (0,1) cos 60° = 1/2, (1,2) cos 30°, (0,2) cos 90° = 0."""
    scorer = FixedEmbeddings(torch.tensor([unit(0), unit(60), unit(90)]), torch.tensor([unit(0)]))
    consistency = scorer.frame_consistency(torch.zeros(3, 8, 8, 3))
    c30 = math.cos(math.radians(30))
    assert consistency["frame_consistency"] == pytest.approx(100 * (0.5 + c30 + 0) / 3, abs=1e-4)
    assert consistency["frame_consistency_consecutive"] == pytest.approx(100 * (0.5 + c30) / 2, abs=1e-4)

"""t2vz.toyworld: the procedural world (deterministic rendering, captions, held-out combinations) and the renderer
used as judge (says yes to what the world draws, no to the wrong colour, shape or an empty scene; measures an
object's appearance across frames). CPU only, a few seconds in all."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from t2vz.toyworld.judge import (OBJECT_TONES, appearance_consistency, as_uint8, colour_labels, judge_image,
                                 largest_region, look_for, shape_scores)
from t2vz.toyworld.world import (BACKGROUND_TONES, BACKGROUNDS, HELD_OUT, OBJECT_COLOURS, SHAPES, SIZE, TONES,
                                 Scene, caption, is_held_out, parse_caption, pixel_grid, render, sample_scene,
                                 scene_for_index, shape_mask, toned)

COLOURS = tuple(OBJECT_COLOURS)


def one_object_scene(colour: str, shape: str, background: str, seed: int, r: float | None = None,
                     cx: float | None = None, cy: float | None = None) -> Scene:
    """A scene of one fixed object (held-out combinations allowed), optionally placed by hand."""
    scene = sample_scene(np.random.default_rng(seed), seed=seed, allow_held_out=True, background=background,
                         things=[(colour, shape)])
    thing = scene.things[0]
    thing = dataclasses.replace(thing, r=thing.r if r is None else r, cx=thing.cx if cx is None else cx,
                                cy=thing.cy if cy is None else cy)
    return dataclasses.replace(scene, things=(thing,))


def moved(scene: Scene, **changes) -> Scene:
    """The scene with its one object changed (position, shape, colour), background untouched."""
    return dataclasses.replace(scene, things=(dataclasses.replace(scene.things[0], **changes),))


def blur_and_noise(image: np.ndarray, rng: np.random.Generator, sigma: float = 8.0) -> np.ndarray:
    """3×3 box blur (edges replicated) plus Gaussian noise of std `sigma` on the 0…255 scale, back to uint8."""
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    blurred = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0
    return np.clip(np.rint(blurred + rng.normal(0.0, sigma, blurred.shape)), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ the world


def test_render_is_deterministic_and_differs_between_indices():
    images = []
    for index in range(4):
        a = render(scene_for_index(7, index))
        b = render(scene_for_index(7, index))  # a fresh Scene from the same (seed, index)
        assert a.shape == (SIZE, SIZE, 3) == (64, 64, 3) and a.dtype == np.uint8
        assert a.tobytes() == b.tobytes()
        assert scene_for_index(7, index) == scene_for_index(7, index)
        images.append(a)
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j]), f"indices {i} and {j} render the same image"
    assert not np.array_equal(render(scene_for_index(7, 0)), render(scene_for_index(8, 0)))  # the seed matters
    # Rendering is a function of the Scene alone: the background layout comes from scene.seed.
    scene = scene_for_index(7, 0)
    assert not np.array_equal(render(scene), render(dataclasses.replace(scene, seed=scene.seed + 1)))
    with pytest.raises(ValueError):
        render(scene, size=32)


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_caption_round_trips(background):
    for things in ([("red", "circle")], [("purple", "diamond")], [("yellow", "square"), ("blue", "triangle")],
                   [("green", "triangle"), ("red", "diamond")]):
        text = caption(background, things)
        assert parse_caption(text) == (things, background), text
    # And for the captions real scenes carry.
    for index in range(20):
        scene = scene_for_index(3, index)
        pairs, bg = parse_caption(scene.caption)
        assert pairs == [(t.colour, t.shape) for t in scene.things] and bg == scene.background


def test_parse_caption_tolerates_extra_words():
    assert parse_caption("Two red squares, and a blue circle on the checkered floor") == (
        [("red", "square"), ("blue", "circle")], "floor")
    assert parse_caption("a circle on a striped wall") == ([], "wall")  # no colour: no pair
    assert parse_caption("a red big circle") == ([("red", "circle")], None)


def test_training_scenes_never_show_held_out_combinations():
    held_in_training, held_if_allowed = 0, 0
    for index in range(500):
        scene = scene_for_index(0, index)
        assert 1 <= len(scene.things) <= 2
        held_in_training += any(is_held_out(t.colour, t.shape, scene.background) for t in scene.things)
        open_scene = scene_for_index(0, index, allow_held_out=True)
        held_if_allowed += any(is_held_out(t.colour, t.shape, open_scene.background) for t in open_scene.things)
    assert held_in_training == 0
    assert held_if_allowed > 0  # the filter has something to remove: ~8% of objects are held-out triples
    # The judge's prompts can ask for each held-out combination by name.
    for colour, shape, background in HELD_OUT:
        scene = sample_scene(np.random.default_rng(0), allow_held_out=True, background=background,
                             things=[(colour, shape)])
        assert scene.background == background and [(t.colour, t.shape) for t in scene.things] == [(colour, shape)]
        assert is_held_out(colour, shape, scene.background)
        assert judge_image(render(scene), scene.caption)["all_ok"]


def test_tones_are_drawn_evenly_and_change_only_the_colour():
    """Every colour is drawn in both of its tones, about equally often; the tone is not in the caption, and a
    scene rendered in the other tone differs only inside its object."""
    scenes = [scene_for_index(3, index) for index in range(400)]
    things = [t for s in scenes for t in s.things]
    for colour in COLOURS:
        tones = [t.tone for t in things if t.colour == colour]
        assert 0.35 < np.mean(tones) < 0.65, (colour, np.mean(tones), len(tones))
    for t in things:
        assert np.abs(np.array(t.rgb) - np.array(TONES[t.colour][t.tone])).max() <= 12, t
        assert str(t.tone) not in caption("grass", [(t.colour, t.shape)])
    # The same draw with the tone forced the other way: same background, place and size; only the colour differs.
    scene = next(s for s in scenes if len(s.things) == 1)
    thing = scene.things[0]
    other = moved(scene, tone=1 - thing.tone, rgb=toned(thing.colour, 1 - thing.tone))
    a, b = render(scene), render(other)
    mask = shape_mask(thing.shape, thing.cx, thing.cy, thing.r + 1, *pixel_grid(SIZE))
    assert np.array_equal(a[~mask], b[~mask]) and not np.array_equal(a[mask], b[mask])


def test_palette_margins():
    """The margins the judge relies on (world.TONES' comment): every object tone ≥ 85 (RGB) from every background
    tone, and ≥ 106 from every other object tone, so a tone jittered by ±12 a channel keeps its name."""
    tones = OBJECT_TONES  # the judge's own array of every colour's tones
    assert len(tones) == 2 * len(COLOURS) and {tuple(t) for t in tones} == {rgb for c in COLOURS for rgb in TONES[c]}
    background = np.array(BACKGROUND_TONES, dtype=float)
    to_background = np.linalg.norm(tones[:, None] - background[None], axis=-1).min()
    between = np.linalg.norm(tones[:, None] - tones[None], axis=-1)
    assert to_background >= 85 and between[~np.eye(len(tones), dtype=bool)].min() >= 106


# ------------------------------------------------------------------------------------------------ the judge


@pytest.fixture(scope="module")
def rendered_scenes():
    scenes = [scene_for_index(11, index, allow_held_out=True) for index in range(150)]
    return scenes, [render(s) for s in scenes]


def test_judge_accepts_rendered_scenes(rendered_scenes):
    # Measured: 150/150 (100%) on these scenes; 300/300 on the first 300 of base seeds 0 and 11.
    scenes, images = rendered_scenes
    assert sum(len(s.things) == 2 for s in scenes) >= 20  # two-object captions are exercised too
    ok = [judge_image(image, s.caption)["all_ok"] for s, image in zip(scenes, images)]
    assert np.mean(ok) >= 0.98, [s.caption for s, good in zip(scenes, ok) if not good]


def test_judge_accepts_blurred_noisy_scenes(rendered_scenes):
    # Measured: 149/150 with a 3×3 box blur and σ = 8 noise (0…255); 299/300 and 300/300 on the first 300 of base
    # seeds 11 and 0 (the miss: a red diamond on grass).
    scenes, images = rendered_scenes
    rng = np.random.default_rng(0)
    ok = [judge_image(blur_and_noise(image, rng), s.caption)["all_ok"] for s, image in zip(scenes, images)]
    assert np.mean(ok) >= 0.95, [s.caption for s, good in zip(scenes, ok) if not good]


def test_judge_reads_the_tone_of_rendered_objects(rendered_scenes):
    # Measured: every object of these 150 scenes (176 objects, both tones of every colour), clean and blurred.
    scenes, images = rendered_scenes
    rng = np.random.default_rng(1)
    things = [(t, image) for s, image in zip(scenes, images) for t in s.things]
    assert {(t.colour, t.tone) for t, _ in things} == {(c, k) for c in COLOURS for k in (0, 1)}
    for t, image in things:
        assert look_for(image, t.colour).tone == t.tone, t
        assert look_for(blur_and_noise(image, rng), t.colour).tone == t.tone, t


def test_judge_rejects_an_absent_colour():
    for index in range(12):
        scene = scene_for_index(5, index, allow_held_out=True)
        image = render(scene)
        present = {t.colour for t in scene.things}
        thing = scene.things[0]
        for colour in COLOURS:
            if colour in present:
                continue
            verdict = judge_image(image, caption(scene.background, [(colour, thing.shape)]))
            assert verdict["colour_ok"] is False and verdict["shape_ok"] is False and not verdict["all_ok"], (
                scene.caption, colour)
        if len(scene.things) == 2:  # one right object and one wrong one: all_ok must be False
            absent = next(c for c in COLOURS if c not in present)
            verdict = judge_image(image, caption(scene.background, [(thing.colour, thing.shape), (absent, "circle")]))
            assert verdict["colour_ok"] and not verdict["all_ok"]


@pytest.mark.parametrize("shape", SHAPES)
def test_judge_rejects_the_wrong_shape(shape):
    for k, (colour, background) in enumerate([("red", "grass"), ("blue", "snow"), ("yellow", "floor")]):
        scene = one_object_scene(colour, shape, background, seed=100 + k)
        image = render(scene)
        right = judge_image(image, scene.caption)
        assert right["colour_ok"] and right["shape_ok"] and right["shape"] == shape  # the control
        for other in SHAPES:
            if other == shape:
                continue
            verdict = judge_image(image, caption(background, [(colour, other)]))
            assert verdict["colour_ok"] and verdict["shape_ok"] is False and verdict["shape"] == shape, (
                scene.caption, other)


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_judge_rejects_an_empty_scene(background):
    for seed in (0, 1):
        image = render(Scene(background, (), seed))
        assert (colour_labels(image) >= 0).sum() < 20  # the backgrounds hold (almost) no object colour
        for colour in COLOURS:
            verdict = judge_image(image, caption(background, [(colour, "circle")]))
            assert verdict["colour_ok"] is False and not verdict["all_ok"], (background, seed, colour)
            assert look_for(image, colour).shape is None


def test_judge_rejects_a_caption_without_objects():
    image = render(scene_for_index(0, 0))
    for text in ("grass", "a circle on grass", "a red thing on sand", "", "circle red"):
        with pytest.raises(ValueError):
            judge_image(image, text)
    with pytest.raises(ValueError):
        look_for(image, "orange")


def test_each_shape_alone_is_classified_as_itself():
    x, y = pixel_grid(SIZE)
    for shape in SHAPES:
        for r in (6, 7.5, 9, 10.3, 11, 12, 13):
            for cx, cy in ((32, 32), (20.5, 40.25), (45.3, 18.7), (r + 1.2, SIZE - r - 1.3)):
                scores = shape_scores(shape_mask(shape, cx, cy, r, x, y))
                assert max(scores, key=scores.get) == shape, (shape, r, cx, cy, scores)
                assert scores[shape] > 0.8
    assert shape_scores(np.zeros((SIZE, SIZE), bool)) == {s: 0.0 for s in SHAPES}


def test_largest_region_is_four_connected():
    mask = np.zeros((10, 10), bool)
    mask[1:4, 1:4] = True  # 9 pixels
    mask[5:9, 5:9] = True  # 16 pixels
    mask[4, 4] = True  # diagonal neighbour of both squares: under 8-connectivity all 26 would be one region
    region = largest_region(mask)
    assert region.sum() == 16 and region[5:9, 5:9].all()
    assert not largest_region(np.zeros((4, 4), bool)).any()


# ------------------------------------------------------------------------------------------------ videos


def test_appearance_consistency_of_a_translated_object():
    for k, shape in enumerate(SHAPES):
        scene = one_object_scene("red", shape, list(BACKGROUNDS)[k], seed=200 + k, r=10.0, cx=22.3, cy=25.6)
        frames = np.stack([render(moved(scene, cx=22.3 + d, cy=25.6 + 0.7 * d)) for d in (0, 2.5, 5, 7.5, 10)])
        assert not np.array_equal(frames[0], frames[-1])
        a = appearance_consistency(frames, "red")
        assert a["object_iou"] >= 0.9 and a["object_same_shape"] == 1.0 and a["object_colour_shift"] < 6, (shape, a)

        # The same place, another shape: the judge sees the change.
        other = SHAPES[(k + 1) % len(SHAPES)]
        changed = np.stack([frames[0], render(moved(scene, shape=other)), render(moved(scene, shape=other))])
        b = appearance_consistency(changed, "red")
        assert b["object_same_shape"] < 1.0 and b["object_iou"] < min(0.85, a["object_iou"] - 0.1), (shape, b)

        # Same shape and place, another tone of red: the colour shift measures it (~20·√3 ≈ 35). The IoU is not
        # quite 1: the anti-aliased edge pixels change tone too, and a few of them change label.
        redder = tuple(int(v) + 20 for v in scene.things[0].rgb)
        tinted = np.stack([frames[0], render(moved(scene, rgb=redder))])
        c = appearance_consistency(tinted, "red")
        assert 25 < c["object_colour_shift"] < 45 and c["object_iou"] >= 0.9, (shape, c)
        assert a["object_same_tone"] == c["object_same_tone"] == 1.0, (shape, a, c)

        # Same shape and place in red's other tone: still red, still this shape, but not frame 1's tone.
        tone = scene.things[0].tone
        retoned = render(moved(scene, tone=1 - tone, rgb=toned("red", 1 - tone)))
        assert judge_image(retoned, caption(scene.background, [("red", shape)]))["all_ok"], shape
        d = appearance_consistency(np.stack([frames[0], frames[1], retoned, retoned]), "red")
        assert d["object_same_tone"] == pytest.approx(1 / 3) and d["object_iou"] >= 0.9, (shape, d)
        assert d["object_colour_shift"] > 60, (shape, d)  # the tones of red are 106 apart


def test_judge_video_measures_motion_per_frame_pair():
    """judge_video's motion error on rendered frames moved by known whole-pixel shifts (circular, so that every
    frame is all scene): near 0 and every pair within 1 px when the shift is the requested one; one wrong pair of
    four is a quarter of the pairs off; the opposite request is off everywhere."""
    from t2vz.toyworld.judge import judge_video

    image = render(one_object_scene("blue", "square", "floor", seed=5, r=9.0, cx=30.0, cy=33.0))
    video = lambda offsets: np.stack([np.roll(image, -o, axis=0) for o in offsets])  # noqa: E731  content moves up
    steady = judge_video(video([0, 4, 8, 12, 16]), "a blue square on a checkered floor", (-4.0, 0.0))
    assert steady["motion_error"] < 0.2 and steady["motion_pairs_within_1px"] == 1.0, steady
    jump = judge_video(video([0, 4, 8, 20, 24]), "a blue square on a checkered floor", (-4.0, 0.0))
    assert jump["motion_pairs_within_1px"] == 0.75 and abs(jump["motion_error"] - 2.0) < 0.2, jump  # 8 px / 4
    opposite = judge_video(video([0, 4, 8, 12, 16]), "a blue square on a checkered floor", (4.0, 0.0))
    assert opposite["motion_pairs_within_1px"] == 0.0, opposite


def test_the_judge_measures_the_applied_warp_on_rendered_frames():
    """Frames of a rendered scene warped by the method's own `warp_latents` (here on the image, the 64 px
    grid standing in for 16×16 latents of a 4× VAE: every latent pixel 4×4 image pixels) move exactly as
    `applied_motion` says: at λ = 12 by 0 or 4 px a frame, not the requested 1.5, so their error against the
    request is ~1.9 px a frame and against the applied warp ~0; at λ = 32 the two agree."""
    from t2vz.method.motion import translation_path, warp_latents
    from t2vz.toyworld.judge import applied_motion, motion_errors, requested_motion

    image = render(one_object_scene("yellow", "circle", "grass", seed=7, r=8.0, cx=20.0, cy=28.0))
    latents = torch.from_numpy(image).permute(2, 0, 1).float()[:, 2::4, 2::4]  # (3, 16, 16): one pixel per block
    for lam, request_error in ((12.0, 1.93), (32.0, 0.0)):
        path = translation_path(range(8), lam, (1.0, 0.0))
        warped = warp_latents(latents[None].expand(8, -1, -1, -1), path)
        frames = warped.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3).permute(0, 2, 3, 1).byte().numpy()
        applied = applied_motion(lam, (1.0, 0.0), 8, (16, 16), (64, 64))
        against_request = motion_errors(frames, requested_motion(lam, (1.0, 0.0), 64, 64)).norm(dim=1).mean()
        assert abs(against_request.item() - request_error) < 0.05, (lam, against_request)
        assert motion_errors(frames, applied).norm(dim=1).max() < 0.05, lam
    assert applied_motion(12.0, (1.0, 0.0), 8, (16, 16), (64, 64))[:, 1].tolist() == [0, -4, 0, 0, -4, 0, -4]


def test_appearance_consistency_without_the_object():
    scene = one_object_scene("green", "square", "sand", seed=300, r=9.0)
    with_object, without = render(scene), render(Scene(scene.background, (), scene.seed))
    first_missing = appearance_consistency(np.stack([without, with_object, with_object]), "green")
    assert all(math.isnan(v) for v in first_missing.values())
    assert all(math.isnan(v) for v in appearance_consistency(with_object[None], "green").values())  # one frame
    # Present in frame 1, gone from one of the two later frames: that frame counts IoU 0 and not the same shape.
    half = appearance_consistency(np.stack([with_object, with_object, without]), "green")
    assert half["object_iou"] == pytest.approx(0.5) and half["object_same_shape"] == pytest.approx(0.5)
    assert half["object_same_tone"] == pytest.approx(0.5)
    assert half["object_colour_shift"] == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------------ input types


def test_float_tensor_and_uint8_give_the_same_judgement():
    for index in range(4):
        scene = scene_for_index(2, index, allow_held_out=True)
        image = render(scene)
        as_float = torch.from_numpy(image).float() / 255.0
        np.testing.assert_array_equal(as_uint8(as_float), image)
        np.testing.assert_array_equal(as_uint8(image.astype(np.float64) / 255.0), image)
        wrong = caption(scene.background, [(next(c for c in COLOURS if c != scene.things[0].colour), "square")])
        for text in (scene.caption, wrong):
            assert judge_image(as_float, text) == judge_image(image, text)
            assert judge_image(as_float.double().numpy(), text) == judge_image(image, text)
    scene = one_object_scene("purple", "triangle", "wall", seed=400, r=9.0, cx=30.0, cy=30.0)
    frames = np.stack([render(moved(scene, cx=30.0 + d)) for d in (0, 3, 6)])
    assert appearance_consistency(torch.from_numpy(frames).float() / 255.0, "purple") == appearance_consistency(
        frames, "purple")
    with pytest.raises(ValueError):
        as_uint8(np.zeros((8, 8, 4), np.uint8))


def test_asking_for_a_held_out_scene_without_allowing_it_is_an_error():
    with pytest.raises(ValueError, match="held-out"):
        sample_scene(np.random.default_rng(0), background="sand", things=[("red", "diamond")])


def test_the_judge_reads_non_square_images():
    scene = sample_scene(np.random.default_rng(3), background="grass", things=[("blue", "circle")])
    empty = render(Scene("grass", (), scene.seed))
    wide = np.concatenate([render(scene), empty[:, :32]], axis=1)  # (64, 96, 3): the circle plus more grass
    verdict = judge_image(wide, "a blue circle on grass")
    assert verdict["all_ok"] and verdict["shape"] == "circle"

"""The toy world: captioned scenes of one or two flat shapes over a structured background, rendered from a seed.

It stands in for the photographs SD 1.5 was trained on, so that a small model of SD 1.5's architecture can be
trained here in minutes and the method measured on something real. Everything is decided by one
`numpy.random.Generator`, so a (seed, index) pair is a scene, forever.

    scene  = sample_scene(np.random.default_rng(0))
    image  = render(scene)          # (64, 64, 3) uint8
    scene.caption                   # "a red triangle on grass"

Axis letters: h w pixels. Colours are RGB in 0…255. A shape of radius r centred on (cx, cy) fills the square
[cx − r, cx + r] × [cy − r, cy + r]: the circle is inscribed in it, the triangle stands on its bottom edge with its
apex at the top centre, the diamond touches the middle of each side. `shape_mask` draws them; the judge
(`toyworld/judge.py`) fits the same masks to what it sees.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

SIZE = 64  # pixels; the toy model is trained at 64×64
SUPERSAMPLE = 4  # render at 4× and average 4×4 blocks: anti-aliased edges, as a camera would see them

# Saturated object colours (tone 0 of each), each ≥ 85 (RGB) from every background tone below and from each other.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (240, 205, 30),
    "green": (30, 185, 70),
    "blue": (40, 70, 215),
    "purple": (145, 50, 185),
}
# Each colour comes in two tones, tone 0 above and tone 1 here, and the caption never says which: "a red circle"
# is drawn in either with equal odds. The tone is what the noise decides about the object's appearance, so it is
# what cross-frame attention has to carry from frame 1 to the others (the paper's "appearance and identity",
# judged by `judge.appearance_consistency`'s object_same_tone). Every tone of every colour is ≥ 85 (RGB) from
# every background tone (green, 85.6 from grass, the nearest) and ≥ 106 from every other object tone.
SECOND_TONES: dict[str, tuple[int, int, int]] = {
    "red": (121, 0, 0),  # dark red
    "yellow": (166, 128, 0),  # ochre
    "green": (51, 255, 165),  # mint
    "blue": (1, 0, 121),  # navy
    "purple": (255, 0, 254),  # magenta
}
TONES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    c: (OBJECT_COLOURS[c], SECOND_TONES[c]) for c in OBJECT_COLOURS}
NUM_TONES = 2
SHAPES = ("circle", "square", "triangle", "diamond")
COLOUR_JITTER = 12  # each object's colour varies by up to this much per channel

# Background kinds: caption phrase, and the muted tones they are painted with (the judge's "not an object" set).
BACKGROUNDS: dict[str, str] = {
    "grass": "grass",
    "sand": "sand",
    "snow": "snow",
    "wall": "a striped wall",
    "floor": "a checkered floor",
}
SKY_TOP, SKY_HORIZON, CLOUD = (105, 150, 205), (170, 200, 228), (236, 238, 242)
GROUND = {"grass": ((88, 122, 72), (66, 98, 56)), "sand": ((208, 188, 146), (182, 160, 118)),
          "snow": ((228, 231, 238), (196, 202, 214))}  # (ground, patches)
SNOW_SKY = ((150, 160, 178), (188, 194, 206))
WALL_TONES = ((150, 128, 110), (112, 96, 86), (138, 138, 132), (96, 100, 104))
WALL_FLOOR = (84, 74, 68)
FLOOR_TONES = ((172, 168, 160), (92, 90, 88), (150, 132, 112), (78, 70, 64))
BACKGROUND_TONES = (SKY_TOP, SKY_HORIZON, CLOUD, *[t for pair in GROUND.values() for t in pair], *SNOW_SKY,
                    *WALL_TONES, WALL_FLOOR, *FLOOR_TONES)

RADIUS = (6, 13)  # object radius range in pixels (12…26 px wide)
# Where the horizon (sky over ground) and the wall's floor line fall, as fractions of the height. Wide ranges, so
# that a scene moved up or down by the method's motion dynamics is still a scene of this world: a model trained
# with the horizon only between 35% and 60% drew the horizon back into that band when asked to move down
# (docs/toy_model.md).
HORIZON = (0.15, 0.85)
WALL_FLOOR_LINE = (0.3, 0.95)
# The sky's gradient runs from SKY_HORIZON at the horizon to SKY_TOP this many pixels above it, wherever the horizon
# is (as a real sky's colour depends on the height above the horizon, not on the image row), so that a scene moved
# up or down keeps a sky of its world. A gradient pinned to the image's top row changed under a vertical warp.
SKY_DEPTH = 48
TWO_OBJECTS = 0.25  # fraction of scenes with two objects

# (colour, shape, background) combinations never shown in training: the judge's held-out prompts. Fixed here so
# that the training data and the judge agree; one per colour, spread over shapes and backgrounds.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "diamond", "sand"),
    ("yellow", "circle", "wall"),
    ("green", "triangle", "snow"),
    ("blue", "square", "floor"),
    ("purple", "circle", "grass"),
    ("red", "square", "floor"),
    ("green", "diamond", "wall"),
    ("blue", "triangle", "grass"),
)


@dataclass(frozen=True)
class Thing:
    """One object: what it is (colour, shape), where (centre cx, cy and radius r, pixels), its exact RGB and which
    of its colour's two `TONES` that RGB was drawn around (the caption does not say)."""

    colour: str
    shape: str
    cx: float
    cy: float
    r: float
    rgb: tuple[int, int, int]
    tone: int = 0


@dataclass(frozen=True)
class Scene:
    """A background kind, its layout parameters (drawn from `seed`) and one or two objects."""

    background: str
    things: tuple[Thing, ...]
    seed: int

    @property
    def caption(self) -> str:
        return caption(self.background, [(t.colour, t.shape) for t in self.things])


def caption(background: str, things: list[tuple[str, str]]) -> str:
    """("grass", [("red", "circle")]) → "a red circle on grass"; two things are joined with "and"."""
    objects = " and ".join(f"a {colour} {shape}" for colour, shape in things)
    return f"{objects} on {BACKGROUNDS[background]}"


def parse_caption(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """The inverse of `caption`, tolerant of extra words: the (colour, shape) pairs in order and the background.

    A colour word followed (possibly after other words) by a shape word makes one pair; a pair without both is
    ignored. The background is the first background word found, or None.
    """
    words = text.lower().replace(",", " ").split()
    pairs, colour = [], None
    for w in words:
        if w in OBJECT_COLOURS:
            colour = w
        elif w.rstrip("s") in SHAPES and colour is not None:
            pairs.append((colour, w.rstrip("s")))
            colour = None
    keys = {w: kind for kind, phrase in BACKGROUNDS.items() for w in phrase.split() if w != "a"}
    background = next((keys[w] for w in words if w in keys), None)
    return pairs, background


def is_held_out(colour: str, shape: str, background: str) -> bool:
    return (colour, shape, background) in HELD_OUT


def sample_scene(rng: np.random.Generator, seed: int = 0, allow_held_out: bool = False,
                 background: str | None = None, things: list[tuple[str, str]] | None = None) -> Scene:
    """Draw a scene. Held-out (colour, shape, background) combinations are redrawn unless `allow_held_out`;
    `background` and `things` fix what the scene shows (the judge's prompts), the rest is drawn."""
    kinds = list(BACKGROUNDS)
    if background is not None and things is not None and not allow_held_out and \
            any(is_held_out(c, s, background) for c, s in things):
        raise ValueError(f"{caption(background, list(things))!r} is a held-out combination (world.HELD_OUT); "
                         "pass allow_held_out=True to draw it")
    while True:
        bg = background or kinds[rng.integers(len(kinds))]
        if things is None:
            n = 2 if rng.random() < TWO_OBJECTS else 1
            what = [(list(OBJECT_COLOURS)[rng.integers(len(OBJECT_COLOURS))], SHAPES[rng.integers(len(SHAPES))])
                    for _ in range(n)]
            if n == 2 and what[0][0] == what[1][0]:
                continue  # two objects of one colour would make the caption ambiguous to the judge
        else:
            what = list(things)
        if allow_held_out or not any(is_held_out(c, s, bg) for c, s in what):
            break
    placed: list[Thing] = []
    jitters = []
    for colour, shape in what:
        for _ in range(100):
            r = rng.uniform(*RADIUS) if len(what) == 1 else rng.uniform(RADIUS[0], 10)
            cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
            if all(abs(cx - o.cx) > r + o.r + 2 or abs(cy - o.cy) > r + o.r + 2 for o in placed):
                break
        jitters.append(rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3))
        placed.append(Thing(colour, shape, float(cx), float(cy), float(r), toned(colour, 0, jitters[-1])))
    # The tones are drawn last, so that a seed places the same objects on the same background as before the world
    # had tones; each object's jitter is added to its tone.
    tones = rng.integers(NUM_TONES, size=len(placed))
    things = tuple(dataclasses.replace(t, rgb=toned(t.colour, int(k), j), tone=int(k))
                   for t, j, k in zip(placed, jitters, tones))
    return Scene(bg, things, int(seed))


def toned(colour: str, tone: int, jitter=(0, 0, 0)) -> tuple[int, int, int]:
    """The RGB of `colour` in `tone` (0 or 1, `TONES`) plus a per-channel jitter, clipped to 0…255."""
    return tuple(int(v) for v in np.clip(np.array(TONES[colour][tone]) + np.asarray(jitter), 0, 255))


def scene_for_index(base_seed: int, index: int, allow_held_out: bool = False) -> Scene:
    """The index-th scene of the dataset with seed `base_seed` (independent of every other index)."""
    seed = int(np.random.SeedSequence([base_seed, index]).generate_state(1)[0])
    return sample_scene(np.random.default_rng(seed), seed=seed, allow_held_out=allow_held_out)


def pixel_grid(size: int, supersample: int = 1, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each (h, w) = (size, width or size), in units of output pixels."""
    ys = (np.arange(size * supersample) + 0.5) / supersample
    xs = (np.arange((width or size) * supersample) + 0.5) / supersample
    return np.meshgrid(xs, ys, indexing="xy")


def shape_mask(shape: str, cx: float, cy: float, r: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask (h, w) of `shape` with centre (cx, cy) and radius r on the coordinate grids x, y."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex (cx, cy − r), base from (cx − r, cy + r) to (cx + r, cy + r)
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


def _ellipses(img, rng, x, y, n, rx, ry, rgb, top=0.0, bottom=float(SIZE)):
    """Paint n random axis-aligned ellipses (radii drawn from rx, ry ranges) with centres between top and bottom."""
    for _ in range(n):
        cx, cy = rng.uniform(0, SIZE), rng.uniform(top, bottom)
        ax, ay = rng.uniform(*rx), rng.uniform(*ry)
        img[((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1] = rgb


def _vertical_gradient(y, y0, y1, top, bottom):
    w = np.clip((y - y0) / max(y1 - y0, 1e-6), 0, 1)[..., None]
    return (1 - w) * np.array(top, float) + w * np.array(bottom, float)


def _background(kind: str, rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The background (h, w, 3) float: sky over ground with clouds and patches, a striped wall, or a floor."""
    if kind in GROUND:
        horizon = rng.uniform(*HORIZON) * SIZE
        top, low = SNOW_SKY if kind == "snow" else (SKY_TOP, SKY_HORIZON)
        img = _vertical_gradient(y, horizon - SKY_DEPTH, horizon, top, low)
        _ellipses(img, rng, x, y, rng.integers(1, 4), (5, 11), (2, 4), CLOUD, 3, horizon - 4)
        ground, patch = GROUND[kind]
        below = y >= horizon
        img[below] = ground
        patches = np.zeros_like(img)
        _ellipses(patches, rng, x, y, rng.integers(4, 9), (3, 8), (1.5, 3), (1, 1, 1), horizon + 2, SIZE)
        img[below & (patches[..., 0] > 0)] = patch
        return img
    if kind == "wall":
        a, b = rng.choice(len(WALL_TONES), size=2, replace=False)
        img = np.empty(x.shape + (3,))
        edges = np.cumsum(rng.uniform(4, 10, size=40)) - rng.uniform(0, 10)
        band = np.searchsorted(edges, x) % 2
        img[band == 0], img[band == 1] = WALL_TONES[a], WALL_TONES[b]
        img[y >= rng.uniform(*WALL_FLOOR_LINE) * SIZE] = WALL_FLOOR
        return img
    if kind == "floor":
        a, b = rng.choice(len(FLOOR_TONES), size=2, replace=False)
        cell = rng.uniform(6, 12)
        ox, oy = rng.uniform(0, 2 * cell, size=2)
        check = (np.floor((x + ox) / cell) + np.floor((y + oy) / cell)) % 2
        img = np.empty(x.shape + (3,))
        img[check == 0], img[check == 1] = FLOOR_TONES[a], FLOOR_TONES[b]
        return img
    raise ValueError(f"unknown background {kind!r}; one of {', '.join(BACKGROUNDS)}")


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as an image (h, w, 3) uint8, anti-aliased by 4× supersampling. The background's layout is drawn
    from `scene.seed`, so a scene renders identically every time."""
    if size != SIZE:
        raise ValueError(f"the toy world is drawn at {SIZE}×{SIZE}, got size={size}")
    x, y = pixel_grid(size, SUPERSAMPLE)
    img = _background(scene.background, np.random.default_rng([scene.seed, 1]), x, y)
    for t in scene.things:
        img[shape_mask(t.shape, t.cx, t.cy, t.r, x, y)] = t.rgb
    s = SUPERSAMPLE
    img = img.reshape(size, s, size, s, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_video(scene: Scene, num_frames: int, velocity: tuple[float, float], size: int = SIZE) -> np.ndarray:
    """A video of `scene` whose objects move by `velocity` = (vx, vy) pixels a frame over the still background:
    frame k (0-based) draws each object at (cx + k·vx, cy + k·vy), (f, h, w, 3) uint8. The source of the editing
    measurements (Tune-A-Video, docs/toy_model.md): a known motion that an edit should keep."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r} must be an integer >= 1")
    vx, vy = (float(v) for v in velocity)
    return np.stack([render(dataclasses.replace(scene, things=tuple(
        dataclasses.replace(t, cx=t.cx + k * vx, cy=t.cy + k * vy) for t in scene.things)), size)
        for k in range(num_frames)])


BACKGROUND_KIND_TONES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "grass": GROUND["grass"], "sand": GROUND["sand"], "snow": (*GROUND["snow"], *SNOW_SKY),
    "wall": (*WALL_TONES, WALL_FLOOR), "floor": FLOOR_TONES,
}  # the tones only that kind of background paints (the sky above grass and sand is shared, so left out)

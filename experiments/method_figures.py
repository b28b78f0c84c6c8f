"""Regenerate the figures of docs/method.md from the toy model (`model=toyworld`, shipped in t2vz/data).

    .venv/bin/python experiments/method_figures.py              # all figures into docs/images/method/
    .venv/bin/python experiments/method_figures.py --out DIR    # ... into DIR
    .venv/bin/python experiments/method_figures.py --check      # regenerate into a temporary folder and compare

Every figure is cut from the runs of `python -m t2vz` listed in RUNS, on the CPU in fp32, with their seeds: the
Algorithm 1 figures and the attention figure from the tiles of one run's trace (`trace=true`, t2vz/method/trace.py;
each tile is the trace's trace/{key}.png, shown at its own 64×64 pixels), the smoothing figure from a second traced
run with background smoothing, and the contrast figure from the frames of four runs (cross-frame attention on/off ×
motion dynamics on/off). The runs are composed from the same override strings the `python -m t2vz` commands in
docs/method.md take (`overrides`), so each figure's command there makes the same images. Labels are drawn in
Pillow's built-in bitmap font, which renders the same on every machine; the symbols are explained in the captions
of docs/method.md.

`--check` compares decoded pixels, not bytes (`compare`): CPUs that take other SIMD paths give toy-model outputs
that differ in the last bits, and the 50 DDIM steps carry that into a few of the 8-bit pixel levels. A figure
passes when its size is the same, the mean |difference| over all its values is at most MEAN_TOLERANCE levels (of
255) and at most FAR_FRACTION of its pixels differ by more than FAR_LEVELS levels in some channel. docs/method.md
(Section 2, "The trace, and the figures of this page") gives what was measured when these were chosen.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "images" / "method"
PROMPT = "a red circle on grass"
# Shared by every run: seed 1 puts the circle in the middle of the frame, δ = (1, 0) pans it left, and t1 = 11
# gives Δt = 3 DDIM steps, the paper's (the toy model's own t0 = t1 = 8 adds no noise in step 4 and would leave
# nothing to show there): T₁ = 221, T₀ = 161. λ is the toy model's own, 32 (4 image pixels a frame). Seed 1 also
# keeps the attention figure's point, the judge's centroid of the circle in frame 2, at (40.69, 45.82): 0.18 pixels
# or more from where its marker (drawn at the integer part) would jump, and 0.69 from a border of the 8×8 tokens, far
# more than last-bit differences move a centroid of some 500 pixels.
BASE = ("seed=1", "method.direction=[1,0]", "method.t1=11")
RUNS = {
    "main": (*BASE, "trace=true"),
    "smoothing": (*BASE, "method.smooth_bg=true", "method.alpha=0.6", "trace=true"),
    "off_motion": (*BASE, "method.cross_frame=off"),
    "first_static": (*BASE, "method.motion_dynamics=false"),
    "off_static": (*BASE, "method.cross_frame=off", "method.motion_dynamics=false"),
}
# main without the trace makes the same frames (tracing changes no frame: tests/test_trace.py), so the contrast
# figure's "first, motion on" cell is the main run's frames.

# --check's tolerance, on the 0..255 scale (docs/method.md, Section 2, "The trace, and the figures of this page",
# has the measurements)
MEAN_TOLERANCE = 1.0
FAR_LEVELS = 4
FAR_FRACTION = 0.0005

# |x̄ᵏ − xᵏ| of the smoothing figure is drawn on a fixed scale, white at this much (latent units, mean over the
# channels; its largest value in the figure is 0.11), so that it shows α: it is (1 − M)·α·|W_k(x¹) − xᵏ|
CHANGE_WHITE = 0.125
TILE, GAP, PAD, LINE = 64, 4, 6, 11  # tile side and gap, margin, bitmap font line height (pixels)


def overrides(run: str) -> list[str]:
    """The `python -m t2vz` overrides of one run (RUNS), as the command line takes them."""
    return [f"prompt={PROMPT}", "device=cpu", "dtype=fp32", *RUNS[run]]


def command(run: str) -> str:
    """The shell command that makes one run, as docs/method.md gives it (with `trace=true`, the figures' tiles are
    the run folder's trace/{key}.png)."""
    words = []
    for option in overrides(run):
        key, value = option.split("=", 1)
        words.append(f'{key}="{value}"' if " " in value else f'"{option}"' if "[" in option else option)
    return " ".join([".venv/bin/python -m t2vz", *words])


# ---------------------------------------------------------------------------------------------------- runs
def generate(runs: list[str]) -> dict[str, tuple[torch.Tensor, object]]:
    """Each run: (frames (f, H, W, 3) in [0, 1], its Trace or None), composed and made as `python -m t2vz` does."""
    from hydra import compose, initialize

    from t2vz.experiment.config import to_generate_config
    from t2vz.experiment.run import config_trace, generate_from_config, load_pipeline

    results, pipe = {}, None
    for run in runs:
        with initialize(version_base="1.3", config_path=None):
            config = to_generate_config(compose("generate", overrides=overrides(run) + ["output.progress=false"]))
        if pipe is None:
            pipe = load_pipeline(config.model, config.device, config.dtype)
        trace = config_trace(config)  # as python -m t2vz ... trace=true
        frames = generate_from_config(config, pipe, trace=trace)
        results[run] = (frames, trace)
    return results


# ------------------------------------------------------------------------------------------------- drawing
def font():
    """Pillow's built-in bitmap font: no FreeType, no system fonts, the same pixels everywhere."""
    from PIL import ImageFont

    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1; before, load_default is it
    return loader() if loader is not None else ImageFont.load_default()


def pixels(image: torch.Tensor) -> np.ndarray:
    """float (H, W, 3) in [0, 1] → uint8, as the trace's trace/{key}.png holds it (`video_io.to_uint8`)."""
    from t2vz.video_io import to_uint8

    return to_uint8(image)


@dataclass
class Cell:
    """One tile of a figure: its image (H, W, 3) uint8 and up to two short label lines under it."""

    image: np.ndarray
    label: tuple[str, ...] = ()


def grid(rows: list[list[Cell]], row_titles: list[str] | None = None, columns: list[str] | None = None,
         label_lines: int = 2):
    """Tiles in rows (a PIL image): an optional title line above each row, optional column headers, labels under
    the tiles."""
    from PIL import Image, ImageDraw

    fnt, n = font(), max(len(r) for r in rows)
    width = PAD * 2 + n * TILE + (n - 1) * GAP
    title_h = LINE + 2 if row_titles else 0
    head_h = LINE + 2 if columns else 0
    label_h = label_lines * LINE + 2 if any(c.label for r in rows for c in r) else 0
    row_h = title_h + TILE + label_h + GAP
    sheet = Image.new("RGB", (width, PAD * 2 + head_h + len(rows) * row_h - GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(columns or []):
        draw.text((PAD + c * (TILE + GAP), PAD), text, fill="black", font=fnt)
    for r, row in enumerate(rows):
        top = PAD + head_h + r * row_h
        if row_titles:
            draw.text((PAD, top), row_titles[r], fill="black", font=fnt)
        for c, cell in enumerate(row):
            left = PAD + c * (TILE + GAP)
            sheet.paste(Image.fromarray(cell.image), (left, top + title_h))
            for i, text in enumerate(cell.label[:label_lines]):
                draw.text((left, top + title_h + TILE + 1 + i * LINE), text, fill="black", font=fnt)
    return sheet


def side_by_side(panels: list, titles: list[str], gap: int = 12):
    """PIL images in one row, each with a title line above it."""
    from PIL import Image, ImageDraw

    fnt = font()
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = LINE + 2 + max(p.height for p in panels)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    left = 0
    for panel, title in zip(panels, titles):
        draw.text((left + PAD, 2), title, fill="black", font=fnt)
        sheet.paste(panel, (left, LINE + 2))
        left += panel.width + gap
    return sheet


def tile(trace, key: str, *label: str) -> Cell:
    return Cell(pixels(trace.tile(key).image), label)


# ------------------------------------------------------------------------------------------------- figures
# Each figure: its runs (of RUNS) and the function that draws it from their results ({run: (frames, trace)}).
def first_frame(results):
    """Steps 1-2: x_T¹; frame 1 at T₁ and T₀, each with the x̂₀¹ predicted from it."""
    trace = results["main"][1]
    info = trace.info
    T1, T0 = info["T1"], info["T0"]
    start = trace.tile("x_T_1").caption.split("T=")[1].split(" ")[0]  # "x_T¹, T=981"
    return grid([[
        tile(trace, "x_T_1", "x_T^1", f"t={start}"),
        tile(trace, "x_T1_1", "x^1 at T1", f"t={T1}"),
        tile(trace, "x0hat_T1_1", "x0-hat^1", f"at T1={T1}"),
        tile(trace, "x_T0_1", "x^1 at T0", f"t={T0}"),
        tile(trace, "x0hat_T0_1", "x0-hat^1", f"at T0={T0}"),
    ]])


def warp(results):
    """Step 3: x_{T₀}¹ and each x̃ᵏ = W_k(x_{T₀}¹) with its δᵏ (512-grid pixels)."""
    trace = results["main"][1]
    path = trace.arrays["path"]

    def shift(k: int) -> str:
        dx, dy = path[k - 1, :, 2]
        return f"d=({dx:g},{dy:g})"
    return grid([[tile(trace, "x_T0_1", "x^1 at T0", "k=1")] + [
        tile(trace, f"warped_{k}", f"x~^{k}", shift(k)) for k in range(2, trace.info["num_frames"] + 1)]])


def ddpm_forward(results):
    """Step 4: x_{T₁}¹ (frame 1's, from step 2) and each x_{T₁}ᵏ after the DDPM forward from T₀."""
    trace = results["main"][1]
    T1 = trace.info["T1"]
    return grid([[tile(trace, "x_T1_1", "x^1 at T1", "(step 2)")] + [
        tile(trace, f"x_T1_{k}", f"x^{k} at T1", f"t={T1}") for k in range(2, trace.info["num_frames"] + 1)]])


def predicted_x0(results):
    """Step 5: every frame's x̂₀ at the first and the middle of the trace's steps of the video pass (x̂₀ at the
    last step is, to the eye, the frames of step 6)."""
    trace = results["main"][1]
    info, f = trace.info, trace.info["num_frames"]
    steps = sorted({int(t.key.split("_")[1][4:]) for t in trace.tiles if t.key.startswith("x0hat_step")})[:2]
    n = len(info["video_timesteps"])
    return grid([[tile(trace, f"x0hat_step{s}_{k}") for k in range(1, f + 1)] for s in steps],
                row_titles=[f"x0-hat of every frame at t={t}, step {s}/{n} of the video pass"
                            for s, t in zip(steps, info["x0_steps"])],
                columns=[f"k={k}" for k in range(1, f + 1)])


def decoded_frames(results):
    """Step 6: the frames."""
    frames = results["main"][0]
    return grid([[Cell(pixels(frame), (f"frame {k}",)) for k, frame in enumerate(frames, 1)]], label_lines=1)


def cross_frame_attention(results):
    """Eq. 8: frame k with its point, and at each probed layer where the point's query attends in frame 1
    (cross-frame) and within frame k (per-frame self-attention)."""
    trace = results["main"][1]
    k = trace.info["frame_k"]
    cells = [tile(trace, f"point_{k}", f"frame {k},", "the point")]
    for layer in sorted(trace.info["attention"], key=lambda layer: layer["level"]):
        level, (th, tw) = layer["level"], layer["grid"]
        cells += [tile(trace, f"attn_L{level}_first", "in frame 1", f"{th}x{tw} tokens"),
                  tile(trace, f"attn_L{level}_own", f"in frame {k}", f"{th}x{tw} tokens")]
    return grid([cells])


def background_smoothing(results):
    """Sec. 3.3: the masks Mᵏ, and frame k's blend at the last step: xᵏ, W_k(x¹), x̄ᵏ and |x̄ᵏ − xᵏ| (the latents'
    mean over channels, white at CHANGE_WHITE: where the blend changed the frame, and by how much)."""
    from t2vz.method.trace import mask_image

    trace = results["smoothing"][1]
    info = trace.info
    k, f, alpha, size = info["frame_k"], info["num_frames"], info["alpha"], (info["height"], info["width"])
    before, after = (trace.tile(f"blend_{which}_{k}").tensor for which in ("before", "after"))
    change = ((after - before).abs().mean(0) / CHANGE_WHITE).clamp(0, 1)
    masks = [Cell(pixels(mask_image(trace.tile(f"mask_{j}").tensor, size)), (f"M^{j}",)) for j in range(1, f + 1)]
    return grid([masks, [
        tile(trace, f"blend_before_{k}", f"x^{k}", "before"),
        tile(trace, f"blend_warped_{k}", f"W_{k}(x^1)"),
        tile(trace, f"blend_after_{k}", f"x-bar^{k}", f"alpha={alpha:g}"),
        Cell(pixels(mask_image(change, size)), ("|x-bar - x|", f"white={CHANGE_WHITE:g}")),
    ]], row_titles=["foreground masks M^k (latent pixels)",
                    f"the blend for frame {k} at the last step, t={info['video_timesteps'][-1]}"])


def contrast(results):
    """The same seed with cross-frame attention first/off (rows) × motion dynamics on/off (columns)."""
    from PIL import Image

    runs = {("first", True): "main", ("off", True): "off_motion", ("first", False): "first_static",
            ("off", False): "off_static"}

    def strip(run: str):
        return grid([[Cell(pixels(frame)) for frame in results[run][0]]])
    rows = [side_by_side([strip(runs[(mode, True)]), strip(runs[(mode, False)])],
                         [f"cross_frame={mode}, motion_dynamics=true", f"cross_frame={mode}, motion_dynamics=false"])
            for mode in ("first", "off")]
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        sheet.paste(row, (0, i * rows[0].height))
    return sheet


FIGURES = {  # name: (its runs, its function); docs/method.md gives each run's `command` under the figure
    "alg1_step1_2_first_frame": (["main"], first_frame),
    "alg1_step3_warp": (["main"], warp),
    "alg1_step4_ddpm_forward": (["main"], ddpm_forward),
    "alg1_step5_x0": (["main"], predicted_x0),
    "alg1_step6_frames": (["main"], decoded_frames),
    "cross_frame_attention": (["main"], cross_frame_attention),
    "background_smoothing": (["smoothing"], background_smoothing),
    "contrast": (["main", "off_motion", "first_static", "off_static"], contrast),
}


def write_png(path: Path, image) -> Path:
    """A PIL image to `path` as an optimised PNG, atomically (`video_io.atomic_file`)."""
    from t2vz.video_io import atomic_file

    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path


def make(out: Path, names: list[str] | None = None) -> list[Path]:
    """Make the runs the figures `names` (None: all of FIGURES) need and write those figures into `out` (created
    if missing) as {name}.png; the paths written. One torch thread while it runs: the same reductions every time on
    one machine."""
    names = list(FIGURES) if names is None else names
    runs = list(dict.fromkeys(run for name in names for run in FIGURES[name][0]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = generate(runs)
    finally:
        torch.set_num_threads(threads)
    return [write_png(Path(out) / f"{name}.png", FIGURES[name][1](results)) for name in names]


# ---------------------------------------------------------------------------------------------- comparing
def read(path: Path) -> np.ndarray:
    """A PNG's decoded pixels, (H, W, 3) uint8."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def compare(expected: Path, actual: Path) -> tuple[bool, str]:
    """(same within the tolerance, what was measured): two PNGs' decoded pixels."""
    a, b = read(expected), read(actual)
    if a.shape != b.shape:
        return False, f"size {b.shape[1]}x{b.shape[0]} != {a.shape[1]}x{a.shape[0]}"
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mean, far = float(diff.mean()), float((diff.max(-1) > FAR_LEVELS).mean())
    ok = mean <= MEAN_TOLERANCE and far <= FAR_FRACTION
    return ok, (f"mean |diff| {mean:.3f}/255 (at most {MEAN_TOLERANCE:g}), {100 * far:.2f}% of pixels off by "
                f"more than {FAR_LEVELS} levels (at most {100 * FAR_FRACTION:g}%)")


def compare_folders(committed: Path, made: Path) -> list[str]:
    """The figures of two folders compared (`compare`): for each that differs beyond the tolerance, or is missing
    from either folder, one line naming it and saying what was measured; empty when all agree."""
    problems = []
    there, new = ({p.name for p in Path(folder).glob("*.png")} for folder in (committed, made))
    for name in sorted(there | new):
        if name not in there:
            problems.append(f"{name}: missing from {committed}")
        elif name not in new:
            problems.append(f"{name}: in {committed} but no longer made by this script")
        else:
            ok, what = compare(Path(committed) / name, Path(made) / name)
            if not ok:
                problems.append(f"{name}: {what}")
    return problems


def check(committed: Path) -> list[str]:
    """Regenerate every figure into a temporary folder and compare with the PNGs in `committed`
    (`compare_folders`)."""
    with tempfile.TemporaryDirectory() as tmp:
        make(Path(tmp))
        return compare_folders(committed, Path(tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Regenerate the figures of docs/method.md from the toy model (CPU, fp32, fixed seeds).",
        epilog="The runs, each as one command:\n" + "\n".join(f"  {run}: {command(run)}" for run in RUNS),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for the PNGs (default: docs/images/method); with --check, the folder compared")
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary folder and compare with the PNGs in --out: exit status 1 "
                             "and the names of the figures that differ beyond the tolerance")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out)
        for line in problems:
            print(f"differs: {line}", file=sys.stderr)
        if problems:
            print(f"method_figures: {len(problems)} figure(s) out of date; regenerate with "
                  "`.venv/bin/python experiments/method_figures.py`", file=sys.stderr)
            return 1
        print(f"method_figures: every figure in {args.out} matches")
        return 0
    written = make(args.out)
    total = sum(p.stat().st_size for p in written)
    for p in written:
        print(f"{p.stat().st_size / 1024:6.1f} KiB  {p}")
    print(f"{total / 1024:6.1f} KiB in {len(written)} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())

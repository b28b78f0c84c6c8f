"""Tables, plots and a frame sheet from one multirun folder (`experiments/report.py`).

    paths = write_report("multirun/2024-01-01/12-00-00")            # into the same folder
    paths = write_report(sweep_dir, out_dir="reports/lambda")

Reads every job folder with `t2vz.experiment.tracking.collect_jobs` and writes (atomically, `t2vz.video_io` helpers):
- `report.csv` / `report.md`: one row per job (overrides, metrics, status, error);
- `report_by_setting.csv` / `.md`: one row per setting (the swept keys other than seed and prompt), with
  n_jobs, n_ok and `{metric}_mean` / `{metric}_std` over that setting's ok jobs (failed jobs are counted, never
  averaged); std is the sample standard deviation (ddof=1), empty when fewer than two values;
- `report_paired.csv` / `.md`: each setting key's values against its baseline (the value of the sweep's first
  job), the other settings held fixed, paired job by job on everything else swept (seed, prompt): per metric the
  mean difference value − baseline, its standard error (std of the differences / √n_pairs), and in how many
  pairs it is higher and lower. Pairing removes what the seed and prompt contribute to both jobs, which the
  per-setting stds include;
- `plot_{metric}_vs_{key}.png` per swept key and metric: mean ± std over ok jobs per value of the key, a line
  plot for a numeric key, a bar chart for a boolean / string key (drawn with Pillow's ImageDraw);
- `plot_{metric}_vs_generate_s.png` per metric when the jobs recorded their generation time: one point per
  setting, its median time against the metric's mean ± std (quality against speed, the fast modes' trade-off);
- `frames_by_setting.png`: per setting one row, its label and the first, middle and last frame of its first ok job.

A swept key is an override whose value differs between jobs (constant overrides such as model=… are not
settings). A folder without any job result raises `ReportError`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..video_io import contact_sheet, write_image, write_text
from .tracking import collect_jobs, parse_overrides, write_summary_csv

NOT_SETTINGS = ("seed", "prompt")  # averaged over: a setting is everything else that was swept
NOT_METRICS = ("job", "status", "error")
TIME_METRIC = "generate_s"  # an experiment job's generation time (`run.run_experiment`), the x of the trade-off plots
PLOT_SIZE = (640, 440)
MARGIN = dict(left=80, right=24, top=40, bottom=56)
FRAME_ROW_MIN_HEIGHT = 64
LABEL_WIDTH = 260
PAD = 4


class ReportError(ValueError):
    """The folder holds nothing to report on (the message says which folder and why)."""


# ---- reading ------------------------------------------------------------------------------------------------

def _job_overrides(folder: Path) -> list[str]:
    try:
        return list(json.loads((folder / "metrics.json").read_text()).get("overrides", []))
    except (OSError, ValueError, TypeError, AttributeError):
        try:
            from omegaconf import OmegaConf
            return list(OmegaConf.load(folder / ".hydra/overrides.yaml"))
        except Exception:
            return []


def load_jobs(sweep_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(rows, override keys, metric names) of a multirun folder; ReportError when it has no job results."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a folder; give a multirun folder (one holding job folders 0/, 1/, …)")
    rows = collect_jobs(sweep_dir)
    if not rows:
        raise ReportError(f"no job results in {sweep_dir}: no job folder with metrics.json or "
                          ".hydra/overrides.yaml; give a multirun folder (one holding job folders 0/, 1/, …)")
    keys = list(dict.fromkeys(k for row in rows for k in parse_overrides(_job_overrides(sweep_dir / row["job"]))))
    metrics = [k for k in dict.fromkeys(k for row in rows for k in row)
               if k not in keys and k not in NOT_METRICS and any(_is_number(row.get(k)) for row in rows)]
    return rows, keys, metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def swept_keys(rows: list[dict[str, Any]], keys: Iterable[str]) -> list[str]:
    """The override keys whose value differs between jobs."""
    return [k for k in keys if len({_ident(row.get(k)) for row in rows}) > 1]


def setting_keys(rows: list[dict[str, Any]], keys: Iterable[str]) -> list[str]:
    """The swept keys that make a setting: all but seed and prompt."""
    return [k for k in swept_keys(rows, keys) if k not in NOT_SETTINGS]


def _ident(value: Any) -> str:
    return repr(value)  # nan == nan here; 1 and True stay apart


def _sort_key(value: Any) -> tuple:
    if _finite(value):
        return (0, value, "")
    return (1, 0, str(value))


def setting_text(keys: list[str], values: tuple) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in zip(keys, values)) or "all jobs"


# ---- statistics ---------------------------------------------------------------------------------------------

def mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    """(mean, sample std, n) of the finite numbers in `values`; NaN mean without any, NaN std below two."""
    x = np.array([v for v in values if _finite(v)], dtype=np.float64)
    mean = float(x.mean()) if len(x) else math.nan
    std = float(x.std(ddof=1)) if len(x) > 1 else math.nan
    return mean, std, len(x)


def group_rows(rows: list[dict[str, Any]], keys: list[str]) -> list[tuple[tuple, list[dict[str, Any]]]]:
    """[(values of `keys`, rows)] in sorted order of the values."""
    groups: dict[tuple, tuple[tuple, list]] = {}
    for row in rows:
        values = tuple(row.get(k) for k in keys)
        groups.setdefault(tuple(map(_ident, values)), (values, []))[1].append(row)
    return sorted(groups.values(), key=lambda g: [_sort_key(v) for v in g[0]])


def by_setting(rows: list[dict[str, Any]], keys: list[str], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per setting: its keys, n_jobs, n_ok, `{metric}_mean`/`_std` over ok jobs, status, error."""
    out = []
    for values, group in group_rows(rows, keys):
        ok = [row for row in group if row.get("status") == "ok"]
        row: dict[str, Any] = dict(zip(keys, values))
        row.update(n_jobs=len(group), n_ok=len(ok))
        for metric in metrics:
            mean, std, _ = mean_std(r.get(metric) for r in ok)
            row[f"{metric}_mean"], row[f"{metric}_std"] = _cell(mean), _cell(std)
        failed = [r for r in group if r.get("status") != "ok"]
        row["status"] = "ok" if not failed else f"{len(ok)}/{len(group)} ok"
        row["error"] = "; ".join(f"job {r['job']}: {r.get('error')}" for r in failed) or None
        out.append(row)
    return out


def _cell(value: float) -> float | None:
    return value if math.isfinite(value) else None


def paired_differences(rows: list[dict[str, Any]], keys: list[str], swept: list[str],
                       metrics: list[str]) -> list[dict[str, Any]]:
    """Per setting key, value and metric: value − baseline over pairs of ok jobs that agree on every other swept
    key (see the module docstring). The baseline is the key's value in the first ok job. A job whose partner
    failed, or whose other swept values occur twice on one side (no unique partner), is left out of the pairs."""
    ok = [row for row in rows if row.get("status") == "ok"]
    out = []
    for key in keys:
        values = list({_ident(row.get(key)): row.get(key) for row in ok}.values())  # in order of first appearance
        if len(values) < 2:
            continue
        fixed = [k for k in keys if k != key]
        match = [k for k in swept if k != key and k not in fixed]

        def unique(group: list[dict[str, Any]], value: Any) -> dict[tuple, dict[str, Any]]:
            side: dict[tuple, list] = {}
            for row in group:
                if _ident(row.get(key)) == _ident(value):
                    side.setdefault(tuple(_ident(row.get(k)) for k in match), []).append(row)
            return {m: rs[0] for m, rs in side.items() if len(rs) == 1}

        for fixed_values, group in group_rows(ok, fixed):
            base = unique(group, values[0])
            for value in values[1:]:
                pairs = [(base[m], row) for m, row in unique(group, value).items() if m in base]
                for metric in metrics:
                    d = np.array([r[metric] - b[metric] for b, r in pairs
                                  if _finite(b.get(metric)) and _finite(r.get(metric))], dtype=np.float64)
                    if not len(d):
                        continue
                    mean, std, n = mean_std(d)
                    out.append({"key": key, "value": value, "baseline": values[0],
                                "fixed": setting_text(fixed, fixed_values) if fixed else "",
                                "metric": metric, "n_pairs": n, "diff_mean": mean,
                                "diff_se": _cell(std / math.sqrt(n)), "n_higher": int((d > 0).sum()), "n_lower": int((d < 0).sum())})
    return out


# ---- tables -------------------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub-flavoured Markdown table; floats to 4 significant digits, `|` and newlines escaped."""
    def cell(value: Any) -> str:
        return _fmt(value).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path, stem: str, rows: list[dict[str, Any]],
                last: tuple[str, ...] = ("status", "error")) -> list[Path]:
    columns = write_summary_csv(out_dir / f"{stem}.csv", rows, last)
    write_text(out_dir / f"{stem}.md", markdown_table(rows, columns))
    return [out_dir / f"{stem}.csv", out_dir / f"{stem}.md"]


# ---- plots --------------------------------------------------------------------------------------------------

def _font():
    from PIL import ImageFont
    return ImageFont.load_default()


def _save(path: Path, image) -> Path:
    return write_image(path, torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255))


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def draw_plot(points: list[tuple[Any, float, float]], title: str, xlabel: str, ylabel: str, bars: bool,
              labels: list[str] | None = None):
    """points [(x, mean, std)] → a Pillow image: axes, ticks and labels, title, error bars (±std; none for NaN
    std); a line through the means for numeric x (`bars=False`), one bar per x otherwise. With `labels` (numeric
    x only), a scatter: each point named by its label, no line."""
    from PIL import Image, ImageDraw

    width, height = PLOT_SIZE
    image = Image.new("RGB", PLOT_SIZE, "white")
    draw, font = ImageDraw.Draw(image), _font()
    x0, x1 = MARGIN["left"], width - MARGIN["right"]
    y0, y1 = height - MARGIN["bottom"], MARGIN["top"]  # pixel rows of the y axis' low and high ends
    err = [0.0 if not math.isfinite(s) else s for _, _, s in points]
    lows = [m - e for (_, m, _), e in zip(points, err)] + ([0.0] if bars else [])
    highs = [m + e for (_, m, _), e in zip(points, err)] + ([0.0] if bars else [])
    lo, hi = min(lows), max(highs)
    if hi - lo < 1e-12:
        lo, hi = lo - 1, hi + 1
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)

    def py(v: float) -> float:
        return y0 - (v - lo) / (hi - lo) * (y0 - y1)

    if bars:
        slot = (x1 - x0) / len(points)
        xs = [x0 + slot * (i + 0.5) for i in range(len(points))]
    else:
        values = [float(x) for x, _, _ in points]
        a, b = min(values), max(values)
        span = (b - a) or 1.0
        a, b = (a - 0.5, b + 0.5) if b == a else (a - 0.05 * span, b + 0.05 * span)
        xs = [x0 + (v - a) / (b - a) * (x1 - x0) for v in values]

    def text(xy, s, anchor):
        draw.text(xy, s, fill="black", font=font, anchor=anchor)

    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black", width=1)  # axes
    for v in _nice_ticks(lo, hi):
        draw.line([(x0 - 4, py(v)), (x0, py(v))], fill="black")
        draw.line([(x0 + 1, py(v)), (x1, py(v))], fill=(225, 225, 225))
        text((x0 - 6, py(v)), f"{v:.3g}", "rm")
    for x, (label, _, _) in zip(xs, points):
        draw.line([(x, y0), (x, y0 + 4)], fill="black")
        text((x, y0 + 6), _fmt(label), "ma")
    text(((x0 + x1) / 2, height - 18), xlabel, "ma")
    text((8, y1 - 14), ylabel, "ls")
    text((width / 2, 12), title, "ma")

    colour = (31, 119, 180)
    centres = [(x, py(m)) for x, (_, m, _) in zip(xs, points)]
    if bars:
        half = min(40.0, (x1 - x0) / len(points) * 0.35)
        for (x, y) in centres:
            draw.rectangle([x - half, min(y, py(0.0)), x + half, max(y, py(0.0))], fill=colour, outline="black")
    else:
        if len(centres) > 1 and labels is None:
            draw.line(centres, fill=colour, width=2)
        for x, y in centres:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        for (x, y), label in zip(centres, labels or []):
            text((x + 7, y - 7), label, "lb")
    for (x, (_, m, _)), e in zip(zip(xs, points), err):
        if e > 0:
            top, bottom = py(m + e), py(m - e)
            draw.line([(x, top), (x, bottom)], fill="black", width=1)
            draw.line([(x - 6, top), (x + 6, top)], fill="black")
            draw.line([(x - 6, bottom), (x + 6, bottom)], fill="black")
    return image


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in name)


def write_plots(out_dir: Path, rows: list[dict[str, Any]], keys: list[str], metrics: list[str]) -> list[Path]:
    """`plot_{metric}_vs_{key}.png` for each setting key and metric with a value in some ok job."""
    ok = [row for row in rows if row.get("status") == "ok"]
    paths = []
    for key in keys:
        numeric = all(_finite(row.get(key)) for row in ok)
        for metric in metrics:
            points = []
            for (value,), group in group_rows(ok, [key]):
                mean, std, n = mean_std(r.get(metric) for r in group)
                if n:
                    points.append((value, mean, std))
            if not points:
                continue
            image = draw_plot(points, f"{metric} vs {key}", key, f"{metric} (mean ± std)", bars=not numeric)
            paths.append(_save(out_dir / _safe(f"plot_{metric}_vs_{key}.png"), image))
    return paths + write_tradeoff_plots(out_dir, ok, keys, metrics)


def write_tradeoff_plots(out_dir: Path, ok: list[dict[str, Any]], keys: list[str], metrics: list[str],
                         time_key: str = TIME_METRIC) -> list[Path]:
    """`plot_{metric}_vs_{time_key}.png` per metric: one point per setting, its median generation time against its
    metric's mean ± std, named by the setting; what a speed sweep (ablate_speed) shows: quality against time. The
    median, because the first job of a sweep also pays the first calls' costs."""
    if time_key not in metrics or not keys:
        return []
    settings = group_rows(ok, keys)
    paths = []
    for metric in metrics:
        if metric == time_key:
            continue
        points, labels = [], []
        for values, group in settings:
            mean, std, n = mean_std(r.get(metric) for r in group)
            times = [r[time_key] for r in group if _finite(r.get(time_key))]
            if n and times:
                points.append((float(np.median(times)), mean, std))
                labels.append("/".join(_fmt(v) for v in values))
        if len(points) < 2:
            continue
        names = "/".join(k.rpartition(".")[2] for k in keys)  # each point is labelled with its values in this order
        image = draw_plot(points, f"{metric} vs generation time (points: {names})", f"{time_key} (median per setting)",
                          f"{metric} (mean ± std)", bars=False, labels=labels)
        paths.append(_save(out_dir / _safe(f"plot_{metric}_vs_{time_key}.png"), image))
    return paths


# ---- frames -------------------------------------------------------------------------------------------------

def first_middle_last(path: Path) -> np.ndarray:
    """uint8 (3, h, w, 3): frames 0, F//2 and F-1 of `frames.npz` (the first video of a batch)."""
    with np.load(path) as data:
        frames = data["frames"]
    if frames.ndim == 5:
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"{path}: frames have shape {frames.shape}, expected (F, H, W, 3) or (B, F, H, W, 3)")
    return frames[[0, len(frames) // 2, len(frames) - 1]]


def frames_sheet(sweep_dir: Path, rows: list[dict[str, Any]], keys: list[str]):
    """One row per setting: its label (Pillow's default font) left of the first, middle and last frame of its
    first ok job (scaled to one common height); "no frames" when it has none. Rows are PAD apart."""
    from PIL import Image, ImageDraw

    strips = []
    for values, group in group_rows(rows, keys):
        strip = None
        for row in group:
            if row.get("status") == "ok" and (sweep_dir / row["job"] / "frames.npz").is_file():
                try:
                    strip = contact_sheet(first_middle_last(sweep_dir / row["job"] / "frames.npz"), columns=3)
                except (OSError, ValueError):
                    continue
                strip = Image.fromarray((strip.numpy() * 255).round().astype(np.uint8))
                label = f"{setting_text(keys, values)}\n(job {row['job']})"
                break
        if strip is None:
            label = f"{setting_text(keys, values)}\n(no frames: no ok job)"
        strips.append((label, strip))
    font = _font()
    height = max([FRAME_ROW_MIN_HEIGHT] + [s.height for _, s in strips if s is not None])
    scaled = [(label, s and s.resize((max(1, round(s.width * height / s.height)), height), Image.NEAREST))
              for label, s in strips]
    width = LABEL_WIDTH + max([s.width for _, s in scaled if s is not None] or [3 * height])
    sheet = Image.new("RGB", (width, len(scaled) * height + (len(scaled) - 1) * PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, strip) in enumerate(scaled):
        top = i * (height + PAD)
        draw.multiline_text((4, top + 4), "\n".join(_wrap(label, draw, font)), fill="black", font=font)
        if strip is None:
            draw.rectangle([LABEL_WIDTH, top, width - 1, top + height - 1], fill=(200, 200, 200))
        else:
            sheet.paste(strip, (LABEL_WIDTH, top))
    return sheet


def _wrap(text: str, draw, font) -> list[str]:
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > LABEL_WIDTH - 8:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


# ---- all of it ----------------------------------------------------------------------------------------------

def write_report(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every table, plot and the frame sheet of `sweep_dir` into `out_dir` (default: `sweep_dir`); the paths."""
    sweep_dir = Path(sweep_dir)
    rows, overrides, metrics = load_jobs(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = setting_keys(rows, overrides)
    swept = swept_keys(rows, overrides)
    job_rows = [{"job": r["job"], **{k: r.get(k) for k in swept},
                 **{k: v for k, v in r.items() if k not in overrides and k != "job"}} for r in rows]
    paths = write_table(out_dir, "report", job_rows)
    paths += write_table(out_dir, "report_by_setting", by_setting(rows, keys, metrics))
    paired = paired_differences(rows, keys, swept, metrics)
    if paired:
        paths += write_table(out_dir, "report_paired", paired, last=())
    paths += write_plots(out_dir, rows, keys, metrics)
    paths.append(_save(out_dir / "frames_by_setting.png", frames_sheet(sweep_dir, rows, keys)))
    return paths

"""Tables, plots and a frame sheet from one multirun folder (`experiments/report.py`).

    paths = write_report("multirun/2024-01-01/12-00-00")            # into the same folder
    paths = write_report(sweep_dir, out_dir="reports/lambda")

Reads every job folder with `t2vz.experiment.tracking.collect_jobs`. A job's status is ok, failed (or missing /
unreadable: counted as failed) or skipped (it could not run on the given models; the reason in `error`): skipped
jobs are neither ok nor failed, and only ok jobs are averaged. A swept key is an override whose value differs
between jobs (constant overrides such as model=… are not settings); seed, prompt and pair (an index into a list of
source-video/edit pairs) are averaged over, every other swept key makes the setting. Keys that Hydra's grammar
prefixes are reported by their name (`+ablation=t2v_zero` → `ablation`). `clip_model`, the name of the CLIP model
the CLIP metrics came from, is a per-job column of report.csv and never a metric. Writes (atomically,
`t2vz.video_io` helpers):
- `report.csv` / `report.md`: one row per job (overrides, metrics, clip_model, status, error);
- `report_by_setting.csv` / `.md`: one row per setting with n_jobs, n_ok, n_failed, n_skipped and
  `{metric}_mean` / `{metric}_std` / `{metric}_ci95` over that setting's ok jobs; std is the sample standard
  deviation (ddof=1), ci95 the half-width of the 95% Student-t interval for the mean (`t_interval`:
  t_{0.975, n−1} · std / √n, the t quantile computed here from the regularized incomplete beta function), both
  empty below two values; status "ok", "skipped" (every job was) or "{n_ok}/{n_jobs} ok", error the failed jobs'
  errors and the skipped jobs' reasons;
- `report_paired.csv` / `.md`: each setting key's values against its baseline (the value of the sweep's first
  job), the other settings held fixed, paired job by job on everything else swept (seed, prompt, pair): per metric
  the mean difference value − baseline, its standard error (std of the differences / √n_pairs, `diff_se`), the
  95% interval's half-width t_{0.975, n_pairs−1} · diff_se (`diff_ci95`), and in how many pairs it is higher and
  lower. Pairing removes what the seed and prompt contribute to both jobs, which the per-setting stds include;
- `report_paper.md` / `.csv`, when the jobs have `clip_score` or `textual_faithfulness`: the paper's table layout,
  one row per setting in the sweep's order, its label, n (its ok videos) and "mean ± 95% half-width" (two
  decimals) of CLIP score and frame consistency (text-to-video: Text2Video-Zero's Table 1) or of frame
  consistency and textual faithfulness (editing, when textual_faithfulness is there: Tune-A-Video's Table 1); a
  setting whose jobs were all skipped is a row "skipped: <reason>" in its note column. The csv holds the same
  rows as numbers (`{metric}_mean`, `{metric}_ci95`);
- `plot_{metric}_vs_{key}.png` per swept key and metric: mean ± the 95% interval's half-width over ok jobs per
  value of the key (the y label says "mean ± 95% interval"), a line plot for a numeric key, a bar chart for a
  boolean / string key (drawn with Pillow's ImageDraw);
- `plot_{metric}_vs_generate_s.png` per metric when the jobs recorded their generation time: one point per
  setting, its median time against the metric's mean ± 95% interval (quality against speed, the fast modes'
  trade-off);
- `frames_by_setting.png`: per setting one row, its label and the first, middle and last frame of its first ok
  job ("skipped: <reason>" for a setting whose jobs were all skipped).

Under every Markdown table a line names the CLIP model(s) the CLIP metrics came from (the distinct `clip_model`
values; `toyworld`, t2vz's toy CLIP, with the note that its scores rank toy-world videos and are not comparable
with published CLIP scores; "no CLIP model: the jobs have no CLIP metrics" when there are none), and a line counts
the ok, failed and skipped jobs. A folder without any job result raises `ReportError`.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..video_io import contact_sheet, write_image, write_text
from .config import TOY_CLIP
from .tracking import collect_jobs, job_counts, parse_overrides, write_summary_csv

NOT_SETTINGS = ("seed", "prompt", "pair")  # averaged over: a setting is everything else that was swept
# clip_model: the CLIP model's name, a string; action, slurm_job, restarts: how the job ran (resume, Slurm)
NOT_METRICS = ("job", "status", "error", "clip_model", "action", "slurm_job", "restarts")
CLIP_METRICS = ("clip_score", "frame_consistency", "frame_consistency_consecutive", "textual_faithfulness",
                "clip_text_score", "frame_consistency_all_pairs")  # the last two: earlier names of the first two
CONFIDENCE = 0.95  # of the intervals (`t_interval`): the `_ci95` columns, the error bars, report_paper.md
TOY_CLIP_NOTE = ("t2vz's toy CLIP, trained on the toy world: its scores rank toy-world videos and are not "
                 "comparable with published CLIP scores")
PAPER_COLUMNS = {  # report_paper.md: (metric, column title), by the metric that makes the sweep that kind
    "textual_faithfulness": [("frame_consistency", "Frame consistency"),
                             ("textual_faithfulness", "Textual faithfulness")],
    "clip_score": [("clip_score", "CLIP score"), ("frame_consistency", "Frame consistency")],
}
PAPER_TITLES = {
    "textual_faithfulness": "Video editing, in the layout of Tune-A-Video's Table 1 (Wu et al. 2023)",
    "clip_score": "Text-to-video, in the layout of Text2Video-Zero's Table 1 (Khachatryan et al. 2023)",
}
TIME_METRIC = "generate_s"  # an experiment job's generation time (`run.run_experiment`), the x of the trade-off plots
INTERVAL_LABEL = "mean ± 95% interval"  # the plots' y label: what the error bars are
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
    names = clean_names(keys, {k for row in rows for k in row})
    rows = [{names.get(k, k): v for k, v in row.items()} for row in rows]
    keys = [names.get(k, k) for k in keys]
    metrics = [k for k in dict.fromkeys(k for row in rows for k in row)
               if k not in keys and k not in NOT_METRICS and any(_is_number(row.get(k)) for row in rows)]
    return rows, keys, metrics


def clean_names(keys: Iterable[str], taken: Iterable[str] = ()) -> dict[str, str]:
    """{override key: its name in the report} for the keys Hydra's grammar prefixes (`+ablation` → `ablation`,
    `++x` → `x`, `~x` → `x`), unless that name is taken by another key or column."""
    keys, taken = list(keys), set(taken) | set(keys)
    names = {k: k.lstrip("+~") for k in keys if k.lstrip("+~") and k.lstrip("+~") != k}
    clean = [n for n in names.values()]
    return {k: n for k, n in names.items() if n not in taken and clean.count(n) == 1}


def counts_text(rows: Iterable[dict[str, Any]]) -> str:
    """"6 jobs: 4 ok, 1 failed, 1 skipped", and how many of the ok ones the last run of the sweep ran and how many
    it skipped as complete already where it skipped some: "4 ok (1 ran, 3 skipped as complete)"."""
    c = job_counts(rows)
    resumed = f" ({c['ran']} ran, {c['resumed']} skipped as complete)" if c["resumed"] else ""
    return (f"{c['jobs']} job{'s' * (c['jobs'] != 1)}: {c['ok']} ok{resumed}, {c['failed']} failed, "
            f"{c['skipped']} skipped")


def clip_models(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The distinct `clip_model` names of the jobs, in order of first appearance."""
    return list(dict.fromkeys(str(row["clip_model"]) for row in rows if row.get("clip_model") not in (None, "")))


def clip_model_line(rows: list[dict[str, Any]], metrics: Iterable[str] = ()) -> str:
    """The line under every table: which CLIP model(s) the CLIP metrics came from (the toy CLIP's with its
    caveat); when no job names one, whether the jobs have CLIP metrics at all."""
    names = clip_models(rows)
    if not names:
        if any(m in CLIP_METRICS for m in metrics):
            return "CLIP model: not recorded in the jobs' metrics.json (they have CLIP metrics, but no clip_model)"
        return "no CLIP model: the jobs have no CLIP metrics"
    named = [f"{n} ({TOY_CLIP_NOTE})" if n == TOY_CLIP else n for n in names]
    return f"CLIP model{'s' * (len(names) > 1)} of the CLIP metrics: " + "; ".join(named)


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


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function, 1 / (1 + d1 / (1 + d2 / (1 + …))) with
    d_2m = m (b − m) x / ((a + 2m − 1)(a + 2m)), d_2m+1 = −(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)),
    evaluated front to back by the modified Lentz method; it converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 100_000):
        for term in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + term * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + term / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < eps:
            return fraction
    raise ArithmeticError(f"the incomplete beta fraction did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) = x^a (1 − x)^b / (a B(a, b)) · the continued fraction,
    through I_x(a, b) = 1 − I_{1−x}(b, a) where that converges faster."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = (a * math.log(x) + b * math.log1p(-x)
                 + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))
    return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom: P(|T| > |t|) = I_{df / (df + t²)}(df / 2, 1 / 2)."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` > 0 degrees of freedom (t_{0.975, 9} = 2.2622): bisection on
    `t_cdf`, to a relative 1e-12."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def t_interval(values: Iterable[Any], confidence: float = CONFIDENCE) -> tuple[float, float, int]:
    """(mean, half-width, n) of the Student-t interval for the mean of the finite numbers in `values` (others
    dropped, as `mean_std` does): half-width = t_{(1 + confidence) / 2, n − 1} · s / √n, s the sample std (ddof=1);
    NaN mean without values, NaN half-width below two."""
    mean, std, n = mean_std(values)
    return mean, _half_width(std, n, confidence), n


def _half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    if n < 2 or not math.isfinite(std):
        return math.nan
    return t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)


def group_rows(rows: list[dict[str, Any]], keys: list[str]) -> list[tuple[tuple, list[dict[str, Any]]]]:
    """[(values of `keys`, rows)] in sorted order of the values."""
    groups: dict[tuple, tuple[tuple, list]] = {}
    for row in rows:
        values = tuple(row.get(k) for k in keys)
        groups.setdefault(tuple(map(_ident, values)), (values, []))[1].append(row)
    return sorted(groups.values(), key=lambda g: [_sort_key(v) for v in g[0]])


def by_setting(rows: list[dict[str, Any]], keys: list[str], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per setting: its keys, n_jobs, n_ok, n_failed, n_skipped, `{metric}_mean` / `_std` / `_ci95` (the
    95% interval's half-width, `t_interval`) over ok jobs, status ("ok", "skipped" when every job was, else
    "{n_ok}/{n_jobs} ok"), error (each failed job's error, then "jobs 4, 5 skipped: <reason>" per reason)."""
    out = []
    for values, group in group_rows(rows, keys):
        ok = [row for row in group if row.get("status") == "ok"]
        counts = job_counts(group)
        row: dict[str, Any] = dict(zip(keys, values))
        row.update(n_jobs=len(group), n_ok=len(ok), n_failed=counts["failed"], n_skipped=counts["skipped"])
        for metric in metrics:
            mean, std, n = mean_std(r.get(metric) for r in ok)
            row[f"{metric}_mean"], row[f"{metric}_std"] = _cell(mean), _cell(std)
            row[f"{metric}_ci95"] = _cell(_half_width(std, n))
        others = [r for r in group if r.get("status") != "ok"]
        row["status"] = ("ok" if not others else "skipped" if counts["skipped"] == len(group)
                         else f"{len(ok)}/{len(group)} ok")
        skipped: dict[str, list[str]] = {}
        for r in group:
            if r.get("status") == "skipped":
                skipped.setdefault(str(r.get("error") or "no reason given"), []).append(str(r["job"]))
        errors = [f"job {r['job']}: {r.get('error')}" for r in others if r.get("status") != "skipped"]
        errors += [f"job{'s' * (len(jobs) > 1)} {', '.join(jobs)} skipped: {reason}"
                   for reason, jobs in skipped.items()]
        row["error"] = "; ".join(errors) or None
        out.append(row)
    return out


def skip_reasons(group: Iterable[dict[str, Any]]) -> str:
    """The distinct reasons (`error`) of the skipped jobs in `group`, joined by "; "."""
    reasons = dict.fromkeys(str(r.get("error") or "no reason given") for r in group if r.get("status") == "skipped")
    return "; ".join(reasons)


def _cell(value: float) -> float | None:
    return value if math.isfinite(value) else None


def paired_differences(rows: list[dict[str, Any]], keys: list[str], swept: list[str],
                       metrics: list[str]) -> list[dict[str, Any]]:
    """Per setting key, value and metric: value − baseline over pairs of ok jobs that agree on every other swept key
    (see the module docstring): n_pairs, diff_mean, diff_se, diff_ci95 (the 95% interval's half-width,
    t_{0.975, n_pairs − 1} · diff_se), n_higher, n_lower. The baseline is the key's value in the first ok job. A job
    whose partner failed, or whose other swept values occur twice on one side (no unique partner), is left out of
    the pairs."""
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
                                "diff_se": _cell(std / math.sqrt(n)), "diff_ci95": _cell(_half_width(std, n)),
                                "n_higher": int((d > 0).sum()), "n_lower": int((d < 0).sum())})
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


def with_notes(table: str, notes: Iterable[str], title: str | None = None) -> str:
    """A Markdown table with `title` above it and each note a paragraph under it (a blank line apart: a line right
    under a table would be read as one more row)."""
    return "".join(f"{part}\n\n" for part in ([f"# {title}"] if title else []) + [table.rstrip("\n"), *notes]
                   ).rstrip("\n") + "\n"


def write_table(out_dir: Path, stem: str, rows: list[dict[str, Any]],
                last: tuple[str, ...] = ("status", "error"), notes: Iterable[str] = ()) -> list[Path]:
    """`{stem}.csv` and `{stem}.md` of `rows`, the md with `notes` under the table."""
    columns = write_summary_csv(out_dir / f"{stem}.csv", rows, last)
    write_text(out_dir / f"{stem}.md", with_notes(markdown_table(rows, columns), notes))
    return [out_dir / f"{stem}.csv", out_dir / f"{stem}.md"]


def _replicates(rows: list[dict[str, Any]], overrides: Iterable[str]) -> str:
    """What the n of a setting runs over: "prompts × seeds", "pairs × seeds", or "one video per job"."""
    swept = swept_keys(rows, overrides)
    names = [f"{k}s" for k in ("prompt", "pair", "seed") if k in swept]
    return " × ".join(names) or "one video per job"


def _interval_text(mean: float, half: float, n: int, n_ok: int) -> str:
    if not n:
        return "–"
    text = f"{mean:.2f} ± {half:.2f}" if math.isfinite(half) else f"{mean:.2f} (n = 1: no interval)"
    return text + (f" (n = {n})" if n != n_ok and n > 1 else "")


def paper_table(rows: list[dict[str, Any]], keys: list[str], metrics: list[str],
                overrides: Iterable[str] = ()
                ) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]], list[str]] | None:
    """The paper's layout, or None when the jobs have neither clip_score nor textual_faithfulness: (title, md rows, csv
    rows, notes). One row per setting, in the sweep's order (that of their first jobs): its label, n (its ok videos),
    then "mean ± 95% half-width" of CLIP score and frame consistency (text-to-video) or frame consistency and textual
    faithfulness (editing; the metrics present decide); a "note" column for settings with skipped or failed jobs
    ("skipped: <reason>")."""
    kind = next((k for k in PAPER_COLUMNS if k in metrics), None)
    if kind is None:
        return None
    columns = [(m, title) for m, title in PAPER_COLUMNS[kind] if m in metrics]
    label = keys[0] if len(keys) == 1 else "setting"
    md_rows, csv_rows = [], []
    first = {id(row): i for i, row in enumerate(rows)}
    for values, group in sorted(group_rows(rows, keys), key=lambda g: min(first[id(r)] for r in g[1])):
        ok = [r for r in group if r.get("status") == "ok"]
        counts = job_counts(group)
        name = _fmt(values[0]) if len(keys) == 1 else setting_text(keys, values)
        md = {label: name, "n": len(ok)}
        flat: dict[str, Any] = {label: name, "n": len(ok)}
        for metric, title in columns:
            mean, half, n = t_interval(r.get(metric) for r in ok)
            md[title] = _interval_text(mean, half, n, len(ok))
            flat[f"{metric}_mean"], flat[f"{metric}_ci95"] = _cell(mean), _cell(half)
        notes = []
        if counts["skipped"]:
            reasons = skip_reasons(group)
            notes.append(f"skipped: {reasons}" if counts["skipped"] == len(group)
                         else f"{counts['skipped']} of {len(group)} jobs skipped: {reasons}")
        if counts["failed"]:
            notes.append(f"{counts['failed']} of {len(group)} jobs failed")
        if notes:
            md["note"] = flat["note"] = "; ".join(notes)
        md_rows.append(md)
        csv_rows.append(flat)
    footnotes = [clip_model_line(rows, metrics),
                 f"mean ± the half-width of a {CONFIDENCE:.0%} Student-t interval for the mean over the n ok videos "
                 f"of each row ({_replicates(rows, overrides)}): t_{{0.975, n−1}} · s / √n, s the sample standard "
                 f"deviation; {counts_text(rows)}."]
    return PAPER_TITLES[kind], md_rows, csv_rows, footnotes


def write_paper_table(out_dir: Path, rows: list[dict[str, Any]], keys: list[str], metrics: list[str],
                      overrides: Iterable[str] = ()) -> list[Path]:
    """`report_paper.md` (the formatted table, its title and notes) and `report_paper.csv` (the same rows as
    numbers: `{metric}_mean`, `{metric}_ci95`); nothing when `paper_table` is None."""
    table = paper_table(rows, keys, metrics, overrides)
    if table is None:
        return []
    title, md_rows, csv_rows, notes = table
    columns = list(dict.fromkeys(k for row in md_rows for k in row if k != "note"))
    columns += ["note"] * any("note" in row for row in md_rows)
    write_summary_csv(out_dir / "report_paper.csv", csv_rows, ())
    write_text(out_dir / "report_paper.md", with_notes(markdown_table(md_rows, columns), notes, title))
    return [out_dir / "report_paper.csv", out_dir / "report_paper.md"]


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
    """points [(x, mean, half-width)] → a Pillow image: axes, ticks and labels, title, error bars (mean ± the
    half-width, the 95% interval in the report's plots; none for a NaN half-width); a line through the means for numeric
    x (`bars=False`), one bar per x otherwise. With `labels` (numeric x only), a scatter: each point named by its label,
    no line."""
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
    """`plot_{metric}_vs_{key}.png` for each setting key and metric with a value in some ok job: per value of the
    key, the mean over its ok jobs ± the 95% interval's half-width (`t_interval`)."""
    ok = [row for row in rows if row.get("status") == "ok"]
    paths = []
    for key in keys:
        numeric = all(_finite(row.get(key)) for row in ok)
        for metric in metrics:
            points = []
            for (value,), group in group_rows(ok, [key]):
                mean, half, n = t_interval(r.get(metric) for r in group)
                if n:
                    points.append((value, mean, half))
            if not points:
                continue
            image = draw_plot(points, f"{metric} vs {key}", key, f"{metric} ({INTERVAL_LABEL})", bars=not numeric)
            paths.append(_save(out_dir / _safe(f"plot_{metric}_vs_{key}.png"), image))
    return paths + write_tradeoff_plots(out_dir, ok, keys, metrics)


def write_tradeoff_plots(out_dir: Path, ok: list[dict[str, Any]], keys: list[str], metrics: list[str],
                         time_key: str = TIME_METRIC) -> list[Path]:
    """`plot_{metric}_vs_{time_key}.png` per metric: one point per setting, its median generation time against its
    metric's mean ± the 95% interval's half-width, named by the setting; what a speed sweep (ablate_speed) shows:
    quality against time. The median, because the first job of a sweep also pays the first calls' costs."""
    if time_key not in metrics or not keys:
        return []
    settings = group_rows(ok, keys)
    paths = []
    for metric in metrics:
        if metric == time_key:
            continue
        points, labels = [], []
        for values, group in settings:
            mean, half, n = t_interval(r.get(metric) for r in group)
            times = [r[time_key] for r in group if _finite(r.get(time_key))]
            if n and times:
                points.append((float(np.median(times)), mean, half))
                labels.append("/".join(_fmt(v) for v in values))
        if len(points) < 2:
            continue
        names = "/".join(k.rpartition(".")[2] for k in keys)  # each point is labelled with its values in this order
        image = draw_plot(points, f"{metric} vs generation time (points: {names})", f"{time_key} (median per setting)",
                          f"{metric} ({INTERVAL_LABEL})", bars=False, labels=labels)
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
    first ok job (scaled to one common height); "no frames" when it has none ("skipped: <reason>" when every job
    of it was skipped). Rows are PAD apart."""
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
            skipped = all(r.get("status") == "skipped" for r in group)
            label = f"{setting_text(keys, values)}\n" + (f"(skipped: {skip_reasons(group)})" if skipped
                                                          else "(no frames: no ok job)")
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
    clip_line, counts = clip_model_line(rows, metrics), counts_text(rows)
    paths = write_table(out_dir, "report", job_rows, notes=[clip_line, f"{counts}."])
    paths += write_table(out_dir, "report_by_setting", by_setting(rows, keys, metrics), notes=[
        clip_line, f"{counts}; `_mean`, `_std` (ddof=1) and `_ci95` (the half-width of the {CONFIDENCE:.0%} "
                   f"Student-t interval for the mean) over each setting's ok jobs ({_replicates(rows, overrides)})."])
    paired = paired_differences(rows, keys, swept, metrics)
    on = ", ".join(k for k in swept if k in NOT_SETTINGS) or "nothing else"
    if paired:
        paths += write_table(out_dir, "report_paired", paired, last=(), notes=[
            clip_line, f"diff = value − baseline over jobs paired on {on}; diff_se = std / √n_pairs, "
                       f"diff_ci95 = t_{{0.975, n_pairs−1}} · diff_se."])
    paths += write_paper_table(out_dir, rows, keys, metrics, overrides)
    paths += write_plots(out_dir, rows, keys, metrics)
    paths.append(_save(out_dir / "frames_by_setting.png", frames_sheet(sweep_dir, rows, keys)))
    return paths

"""`posttrain report RUN_DIR [RUN_DIR ...]`: figures and a summary of runs, from their metrics.jsonl alone.

One PNG per group of metrics (loss, optimizer, throughput, reward, KL and entropy, clipping, completion length,
objective mix, evaluation, time), one panel per metric, every run overlaid in its own colour with a legend; dotted
vertical lines mark where a run's stages start. A metric that no run logged gets no panel, a group without panels no
file. Each PNG carries its panels and runs in its metadata (tEXt chunk "Description", JSON), so what a figure shows
can be checked without looking at it. `report.md` beside them: final and best held-out accuracy, wall time per stage
and the split of an RL step's time between generation, rewards, log-probabilities, training and weight sync.

Rendered with matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch).
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# group -> metric name patterns (fnmatch), in panel order
GROUPS: dict[str, list[str]] = {
    "loss": ["loss", "loss/*"],
    "optimizer": ["lr", "grad_norm"],
    "throughput": ["tokens_per_s"],
    "reward": ["reward/mean", "reward/std", "frac_reward_zero_std", "reward/*/mean"],
    "kl_entropy": ["kl", "*/kl", "entropy"],
    "clipping": ["clip_ratio/*", "completion/clipped_ratio"],
    "length": ["completion/mean_length", "completion/min_length", "completion/max_length"],
    "mix": ["mix/*"],
    "eval": ["eval/accuracy"],
    "time": ["time/*"],
}
TIME_PARTS = ("generate", "reward", "logprobs", "train", "sync")     # the parts of time/step, in step order


class ReportError(ValueError):
    """A metrics file that cannot be read: names the file and line."""


@dataclass
class Run:
    """One run's metrics: series[name] = [(step, value)] (the last value logged for a step wins, as after a resume)."""

    label: str
    path: Path
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)       # per stage: index, first_step, last_step, start, end


def read_run(path: str | Path, label: str | None = None) -> Run:
    """Read RUN_DIR/metrics.jsonl (or a metrics file given directly). ReportError naming the file and line for an
    empty file, a line that is not JSON, or a row without an integer `step`."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl here (is it a run directory?)")
    rows = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{file}:{n}: not valid JSON ({e.msg}, column {e.colno}): {line[:80]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ReportError(f"{file}:{n}: expected a JSON object with an integer 'step', got {line[:80]!r}")
        rows.append(row)
    if not rows:
        raise ReportError(f"{file}: empty: no logged step")
    return _run_of(rows, label or (path.name if path.is_dir() else path.parent.name), path)


def _run_of(rows: list[dict], label: str, path: Path) -> Run:
    series: dict[str, dict[int, float]] = {}
    stages: dict[int, dict] = {}
    for row in rows:
        step = row["step"]
        for key, value in row.items():
            number = _number(value)
            if key not in ("step", "time", "stage") and number is not None:
                series.setdefault(key, {})[step] = number
        if "stage" in row:
            s = stages.setdefault(int(row["stage"]), {"index": int(row["stage"]), "first_step": step, "start": None})
            s["last_step"] = step
            if isinstance(row.get("stage_name"), str):                     # in the stage's header row
                s["name"] = row["stage_name"]
            if "time" in row:
                s["start"] = row["time"] if s["start"] is None else s["start"]
                s["end"] = row["time"]
    return Run(label, path, {k: sorted(v.items()) for k, v in series.items()}, [stages[i] for i in sorted(stages)])


def _number(value) -> float | None:
    """Metrics are numbers; non-finite ones are written as 'nan' / 'inf' strings (JSON has none)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def panels(runs: list[Run]) -> dict[str, list[str]]:
    """group -> the metric names some run logged, in the group's pattern order."""
    names = sorted({k for r in runs for k in r.series})
    out = {}
    for group, patterns in GROUPS.items():
        chosen: list[str] = []
        for pattern in patterns:
            chosen += [n for n in names if fnmatch.fnmatchcase(n, pattern) and n not in chosen]
        if chosen:
            out[group] = chosen
    return out


def plot_group(runs: list[Run], group: str, metrics: list[str], out: Path) -> dict[str, list[str]]:
    """One PNG: a panel per metric, a line per run that logged it. Returns {metric: [run labels]} (also written into
    the PNG's metadata)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    shown: dict[str, list[str]] = {}
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        shown[metric] = []
        for run, color in zip(runs, colors):
            points = run.series.get(metric)
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, color=color, label=run.label, marker="o" if len(points) <= 30 else None,
                    markersize=3, linewidth=1.2)
            for stage in run.stages[1:]:
                ax.axvline(stage["first_step"], color=color, linestyle=":", linewidth=0.8)
            shown[metric].append(run.label)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, label=r.label) for r, c in zip(runs, colors)]
    fig.legend(handles=handles, loc="outside upper right", ncols=min(len(runs), 4), fontsize=9)
    fig.suptitle(group, x=0.01, ha="left", fontsize=12, fontweight="bold")
    fig.savefig(out, dpi=100, metadata={"Title": group, "Description": json.dumps(shown)})
    return shown


def summary(runs: list[Run], figures: dict[str, Path]) -> str:
    """report.md: held-out accuracy, wall time per stage, RL step time split, the figures."""
    lines = ["# posttrain report", "", "| run | metrics |", "|---|---|"]
    lines += [f"| {r.label} | `{r.path}` |" for r in runs]
    lines += ["", "## Held-out accuracy (eval/accuracy)", "", "| run | final (step) | best (step) |", "|---|---|---|"]
    for r in runs:
        acc = r.series.get("eval/accuracy")
        if acc:
            best = max(acc, key=lambda p: p[1])
            lines.append(f"| {r.label} | {acc[-1][1]:.4f} ({acc[-1][0]}) | {best[1]:.4f} ({best[0]}) |")
        else:
            lines.append(f"| {r.label} | not evaluated | |")
    lines += ["", "## Wall time per stage", "", "From the stage's first to its last logged row (a pause between a stop "
              "and `--resume` counts).", "", "| run | stage | steps | wall time |", "|---|---|---|---|"]
    for r in runs:
        for s in r.stages:
            wall = _duration(s["end"] - s["start"]) if s.get("start") is not None else "?"
            stage = f"{s['index']} ({s['name']})" if "name" in s else f"{s['index']}"
            lines.append(f"| {r.label} | {stage} | {s['first_step']}..{s['last_step']} | {wall} |")
    lines += _time_split(runs)
    lines += ["", "## Figures", ""] + [f"![{g}]({p.name})" for g, p in figures.items()]
    return "\n".join(lines) + "\n"


def _time_split(runs: list[Run]) -> list[str]:
    """Mean seconds per logged RL step of each part of time/step, and its share of the step."""
    header = ["", "## Time per RL step", "", "Mean seconds over the logged steps (share of `time/step`).", "",
              "| run | " + " | ".join(TIME_PARTS) + " | step |", "|---|" + "---|" * (len(TIME_PARTS) + 1)]
    lines = []
    for r in runs:
        step = r.series.get("time/step")
        if not step:
            continue
        total = sum(v for _, v in step) / len(step)
        cells = []
        for part in TIME_PARTS:
            values = [v for _, v in r.series.get(f"time/{part}", [])]
            mean = sum(values) / len(values) if values else None
            cells.append("-" if mean is None else f"{mean:.3f} ({100 * mean / total:.0f}%)" if total else f"{mean:.3f}")
        lines.append(f"| {r.label} | " + " | ".join(cells) + f" | {total:.3f} |")
    return header + lines if lines else ["", "## Time per RL step", "", "No RL stage logged `time/step`."]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def write_report(run_dirs: list[str | Path], out: str | Path) -> dict[str, dict[str, list[str]]]:
    """Read every run, write OUT/<group>.png and OUT/report.md. Returns {group: {metric: [run labels]}}."""
    runs = [read_run(d) for d in run_dirs]
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):                       # same directory names: use the paths
        for r in runs:
            r.label = str(r.path)
    groups = panels(runs)
    if not groups:
        raise ReportError(f"{', '.join(str(r.path) for r in runs)}: no metric to plot (rows hold only bookkeeping)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shown, figures = {}, {}
    for group, metrics in groups.items():
        figures[group] = out / f"{group}.png"
        shown[group] = plot_group(runs, group, metrics, figures[group])
    (out / "report.md").write_text(summary(runs, figures))
    return shown

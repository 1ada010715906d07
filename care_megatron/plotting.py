"""The run's curves as one PNG: reward, training and held-out accuracy (overall and per task), format
and ``<think>`` length (training and held-out: a policy can keep its accuracy while it drops its
rationale), failure-signal share, K', RGR success, loss; with a frozen-policy baseline, also the RL
run's training accuracy minus the baseline's on the same prompt sequence."""
from __future__ import annotations

from pathlib import Path

from care_megatron.metrics import read_metrics

PANELS = (
    ("mean reward", (("reward/mean", ""),)),
    ("training accuracy (rollouts)", (("accuracy/mean", ""),)),
    ("held-out accuracy (greedy)", (("eval/accuracy", ""),)),
    ("held-out accuracy (sampled, mean@N)", (("eval_sampled/accuracy", ""),)),
    ("format rate", (("format/mean", "training"), ("eval/format", "held-out, greedy"),
                     ("eval_sampled/format", "held-out, sampled"))),
    ("mean <think> length (tokens)", (("length/think_mean", "training"), ("eval/think_length", "held-out, greedy"),
                                      ("eval_sampled/think_length", "held-out, sampled"))),
    ("failure-signal share", (("signal/failure_share", ""),)),
    ("mean K'", (("kprime/mean", ""),)),
    ("RGR success rate", (("rgr/success_rate", ""),)),
    ("loss", (("loss", ""),)),
)
"""Panel title -> the metric keys it draws, each with the curve's label inside the panel (empty for a
panel of one key). A panel is drawn when any run has any of its keys; runs from before a key was
logged simply lack that curve."""


def plot_run(metrics_path: str | Path, out_png: str | Path, title: str | None = None,
             others: dict[str, str | Path] | None = None, baseline: str | Path | None = None) -> Path | None:
    """Plot the panels present in ``metrics_path`` (and, overlaid, in each of ``others``: label -> path).

    ``baseline``: metrics of a frozen-policy run on the same prompt sequence (same seeds, learning
    rate ~0, e.g. ``tools/seed_sweep.py``'s ``frozen/``); it is overlaid as ``frozen policy`` and adds
    the panel of :func:`draw_gain_over_baseline`. Held-out accuracy per task gets its own panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {title or Path(metrics_path).parent.name: read_metrics(metrics_path)}
    for label, path in (others or {}).items():
        runs[label] = read_metrics(path)
    main_rows = next(iter(runs.values()))
    baseline_rows = read_metrics(baseline) if baseline is not None else None
    if baseline_rows is not None:
        runs[BASELINE_LABEL] = baseline_rows
    panels = [(title, keys) for title, keys in PANELS
              if any(k in row for k, _ in keys for rows in runs.values() for row in rows)]
    if not panels:
        return None
    extra = []  # (draw function, its arguments) of the panels beyond PANELS
    if baseline_rows is not None:
        extra.append((draw_gain_over_baseline, (main_rows, baseline_rows)))
    if task_accuracy_keys(main_rows):
        extra.append((draw_task_accuracy, (main_rows,)))
    panels += [("", ())] * len(extra)
    cols = 3
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, (draw, args) in zip(list(axes.flat)[len(panels) - len(extra):], extra):
        draw(ax, *args)
    for ax, (title, keys) in zip(axes.flat, panels[:len(panels) - len(extra)]):
        for key, curve in keys:
            for name, rows in runs.items():
                label = f"{name}: {curve}" if curve and len(runs) > 1 else (curve or name)
                draw_curve(ax, [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))],
                           label, evaluation=key.startswith(("eval/", "eval_sampled/")))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.get_legend_handles_labels()[0]:  # which curve is training, which held-out
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def draw_curve(ax, pts: list[tuple[float, float]], label: str, evaluation: bool) -> None:
    """One metric against the step: evaluations (and short runs) as markers; per-step training values
    are noisy, so a faint raw curve under a bold trailing mean over ~10% of the run."""
    if not pts:
        return
    xs, ys = zip(*pts)
    if evaluation or len(ys) < 8:
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
        return
    line, = ax.plot(xs, ys, alpha=0.3, linewidth=1)
    window = max(3, len(ys) // 10)
    smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
    ax.plot(xs, smooth, color=line.get_color(), linewidth=2, label=label)


BASELINE_LABEL = "frozen policy"
TASK_PREFIX = "eval/accuracy/"


def gain_over_baseline(rows: list[dict], baseline_rows: list[dict], key: str = "accuracy/mean",
                       window: int | None = None) -> dict[str, list[float]]:
    """Per-step ``key`` of ``rows`` minus ``baseline_rows``' at the same step, with a trailing mean.

    A frozen-policy baseline sees the same prompt at each step, so the difference removes the prompt
    sequence's own difficulty. ``window`` (default ~10% of the steps, at least 5) is the trailing
    window; ``low`` / ``high`` are the trailing mean -+ 2 standard errors of the differences in it."""
    base = {r["step"]: r[key] for r in baseline_rows if isinstance(r.get(key), (int, float))}
    pts = [(r["step"], r[key] - base[r["step"]]) for r in rows
           if isinstance(r.get(key), (int, float)) and r["step"] in base]
    out: dict[str, list[float]] = {"step": [p[0] for p in pts], "diff": [p[1] for p in pts],
                                   "mean": [], "low": [], "high": []}
    window = window or max(5, len(pts) // 10)
    diffs = out["diff"]
    for i in range(len(diffs)):
        chunk = diffs[max(0, i - window + 1):i + 1]
        mean = sum(chunk) / len(chunk)
        sd = (sum((v - mean) ** 2 for v in chunk) / (len(chunk) - 1)) ** 0.5 if len(chunk) > 1 else 0.0
        half = 2 * sd / len(chunk) ** 0.5
        out["mean"].append(mean)
        out["low"].append(mean - half)
        out["high"].append(mean + half)
    return out


def draw_gain_over_baseline(ax, rows: list[dict], baseline_rows: list[dict]) -> None:
    """Panel: RL training accuracy minus the frozen policy's (:func:`gain_over_baseline`); a band
    clear of zero is learning seen through the noise of the prompt order."""
    gain = gain_over_baseline(rows, baseline_rows)
    ax.set_title("training accuracy: RL - frozen policy")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    if not gain["step"]:
        return
    ax.plot(gain["step"], gain["diff"], alpha=0.3, linewidth=1, color="C0")
    ax.fill_between(gain["step"], gain["low"], gain["high"], color="C0", alpha=0.2)
    ax.plot(gain["step"], gain["mean"], color="C0", linewidth=2, label="trailing mean +- 2 s.e.")
    ax.legend(fontsize=8)


def task_accuracy_keys(rows: list[dict]) -> list[str]:
    """The per-task held-out accuracy keys (``eval/accuracy/<task>``) present in ``rows``, sorted."""
    return sorted({k for r in rows for k in r if k.startswith(TASK_PREFIX)})


def draw_task_accuracy(ax, rows: list[dict]) -> None:
    """Held-out accuracy of each task on the fixed held-out set, against the step."""
    for key in task_accuracy_keys(rows):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=3, label=key[len(TASK_PREFIX):])
    ax.set_title("held-out accuracy per task")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

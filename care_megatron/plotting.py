"""The run's curves as one PNG: reward, held-out accuracy, failure-signal share, K', RGR success, loss."""
from __future__ import annotations

from pathlib import Path

from care_megatron.metrics import read_metrics

PANELS = (
    ("reward/mean", "mean reward"),
    ("eval/accuracy", "held-out accuracy"),
    ("signal/failure_share", "failure-signal share"),
    ("kprime/mean", "mean K'"),
    ("rgr/success_rate", "RGR success rate"),
    ("loss", "loss"),
)


def plot_run(metrics_path: str | Path, out_png: str | Path, title: str | None = None,
             others: dict[str, str | Path] | None = None) -> Path | None:
    """Plot the panels present in ``metrics_path`` (and, overlaid, in each of ``others``: label -> path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {title or Path(metrics_path).parent.name: read_metrics(metrics_path)}
    for label, path in (others or {}).items():
        runs[label] = read_metrics(path)
    panels = [(k, t) for k, t in PANELS if any(k in row for rows in runs.values() for row in rows)]
    if not panels:
        return None
    cols = 3
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if key.startswith("eval/") or len(ys) < 8:
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
            else:  # per-step values are noisy: faint raw curve, bold trailing mean over ~10% of the run
                line, = ax.plot(xs, ys, alpha=0.3, linewidth=1)
                window = max(3, len(ys) // 10)
                smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1])
                          for i in range(len(ys))]
                ax.plot(xs, smooth, color=line.get_color(), linewidth=2, label=name)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

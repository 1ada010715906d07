"""curves.png: the frozen-policy comparison (closed-form differences) and the per-task panel."""
import json

import pytest

from care_megatron.plotting import gain_over_baseline, plot_run, task_accuracy_keys


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gain_over_baseline_closed_form():
    rl = [{"step": s, "accuracy/mean": a} for s, a in zip([1, 2, 3, 4], [0.5, 0.75, 0.25, 1.0])]
    frozen = [{"step": s, "accuracy/mean": a} for s, a in zip([1, 2, 3, 4], [0.5, 0.25, 0.25, 0.5])]
    frozen.append({"step": 0, "eval/accuracy": 0.3})  # an evaluation row has no training accuracy
    gain = gain_over_baseline(rl, frozen, window=2)
    assert gain["step"] == [1, 2, 3, 4]
    assert gain["diff"] == [0.0, 0.5, 0.0, 0.5]
    assert gain["mean"] == [0.0, 0.25, 0.25, 0.25]
    # window of two differences {0, 0.5}: sd = sqrt(0.125), s.e. = sd / sqrt(2) = 0.25, band = mean -+ 0.5
    assert gain["low"][1:] == pytest.approx([-0.25] * 3)
    assert gain["high"][1:] == pytest.approx([0.75] * 3)
    assert gain["low"][0] == gain["high"][0] == 0.0  # one value: no spread


def test_gain_over_baseline_pairs_by_step():
    rl = [{"step": 1, "accuracy/mean": 0.5}, {"step": 2, "accuracy/mean": 0.9}]
    frozen = [{"step": 2, "accuracy/mean": 0.4}]
    assert gain_over_baseline(rl, frozen)["diff"] == pytest.approx([0.5])


def test_curves_png_has_frozen_and_per_task_panels(tmp_path, monkeypatch):
    rows = [{"step": 0, "eval/accuracy": 0.4, "eval/accuracy/a": 0.2, "eval/accuracy/b": 0.6}]
    rows += [{"step": s, "reward/mean": 0.1 * s, "accuracy/mean": 0.05 * s, "loss": 1.0 / s} for s in range(1, 13)]
    rows.append({"step": 12, "eval/accuracy": 0.6, "eval/accuracy/a": 0.5, "eval/accuracy/b": 0.7})
    frozen = [{"step": s, "reward/mean": 0.1, "accuracy/mean": 0.05, "loss": 1.0} for s in range(1, 13)]
    metrics = _write(tmp_path / "run" / "metrics.jsonl", rows)
    base = _write(tmp_path / "run" / "frozen" / "metrics.jsonl", frozen)
    assert task_accuracy_keys(rows) == ["eval/accuracy/a", "eval/accuracy/b"]

    import matplotlib.figure

    titles = []
    real_savefig = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        titles.append([ax.get_title() for ax in fig.axes if ax.axison])
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    out = plot_run(metrics, tmp_path / "curves.png", baseline=base)
    assert out.stat().st_size > 1000
    assert titles[-1] == ["mean reward", "training accuracy (rollouts)", "held-out accuracy (greedy)", "loss",
                          "training accuracy: RL - frozen policy", "held-out accuracy per task"]
    plot_run(metrics, tmp_path / "plain.png")  # without a baseline: no difference panel
    assert "training accuracy: RL - frozen policy" not in titles[-1]
    assert "held-out accuracy per task" in titles[-1]


def _record_panels(monkeypatch):
    """Patch savefig to keep, per drawn panel title, its curves as (label, x, y)."""
    import matplotlib.figure

    panels = []
    real_savefig = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        panels.append({ax.get_title(): [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
                                        for line in ax.get_lines() if not line.get_label().startswith("_")]
                       for ax in fig.axes if ax.axison})
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return panels


def test_format_and_think_length_panels_draw_training_and_heldout(tmp_path, monkeypatch):
    rows = [{"step": 0, "eval/accuracy": 0.4, "eval/format": 0.9, "eval/think_length": 40.0}]
    rows += [{"step": s, "accuracy/mean": 0.5, "format/mean": 1.0 - 0.1 * s, "length/think_mean": 30.0 - s}
             for s in (1, 2, 3)]
    rows.append({"step": 3, "eval/accuracy": 0.6, "eval/format": 0.5, "eval/think_length": 12.5})
    panels = _record_panels(monkeypatch)
    plot_run(_write(tmp_path / "run" / "metrics.jsonl", rows), tmp_path / "curves.png")
    drawn = panels[-1]
    assert drawn["format rate"] == [("training", [1, 2, 3], pytest.approx([0.9, 0.8, 0.7])),
                                    ("held-out, greedy", [0, 3], [0.9, 0.5])]
    assert drawn["mean <think> length (tokens)"] == [("training", [1, 2, 3], [29.0, 28.0, 27.0]),
                                                     ("held-out, greedy", [0, 3], [40.0, 12.5])]


def test_format_panels_tolerate_runs_from_before_the_keys(tmp_path, monkeypatch):
    # an older run: training format and think length, but no held-out format or think length
    old = [{"step": 0, "eval/accuracy": 0.4}]
    old += [{"step": s, "accuracy/mean": 0.5, "format/mean": 0.5, "length/think_mean": 20.0} for s in (1, 2)]
    new = [{"step": 0, "eval/accuracy": 0.4, "eval/format": 1.0, "eval/think_length": 8.0}]
    panels = _record_panels(monkeypatch)
    plot_run(_write(tmp_path / "old" / "metrics.jsonl", old), tmp_path / "old.png", title="old")
    assert [c[0] for c in panels[-1]["mean <think> length (tokens)"]] == ["training"]
    plot_run(_write(tmp_path / "old" / "metrics.jsonl", old), tmp_path / "both.png", title="old",
             others={"new": _write(tmp_path / "new" / "metrics.jsonl", new)})
    assert [c[0] for c in panels[-1]["format rate"]] == ["old: training", "new: held-out, greedy"]
    plot_run(_write(tmp_path / "bare" / "metrics.jsonl", [{"step": 1, "loss": 1.0}]), tmp_path / "bare.png")
    assert list(panels[-1]) == ["loss"]

"""Reading a run's metrics.jsonl while the run may still be going or was killed (the comparison and
seed-sweep tools resume on such directories)."""
import json

import pytest

from care_megatron.metrics import read_metrics, read_run_metrics


def test_read_run_metrics_skips_a_line_cut_by_a_kill_and_reads_a_missing_file_as_empty(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_run_metrics(path) == []
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert read_run_metrics(path) == rows
    with pytest.raises(json.JSONDecodeError):  # the strict reader (plots of a finished run) still refuses it
        read_metrics(path)


def test_resumed_logger_drops_later_steps_from_metrics_and_groups_files(tmp_path):
    """A run resumed from its step-2 checkpoint keeps steps <= 2 in metrics.jsonl and groups.jsonl (the
    steps after the checkpoint are re-run and would otherwise appear twice); a fresh run starts both anew."""
    import json

    from care_megatron.metrics import MetricsLogger

    for name in ("metrics.jsonl", "groups.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"step": s, "group": 0}) + "\n" for s in (0, 1, 2, 3, 4))
                                     + '{"step": 5, "gro')
    MetricsLogger(tmp_path, total_steps=5, start_step=2, resumed=True, tensorboard=False, progress=False).close()
    for name in ("metrics.jsonl", "groups.jsonl"):
        assert [json.loads(l)["step"] for l in (tmp_path / name).read_text().splitlines()] == [0, 1, 2]
    MetricsLogger(tmp_path, total_steps=5, tensorboard=False, progress=False).close()
    assert (tmp_path / "groups.jsonl").read_text() == "" and (tmp_path / "metrics.jsonl").read_text() == ""

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

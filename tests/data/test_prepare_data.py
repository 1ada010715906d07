"""tools/prepare_data.py: load the three paper sources from their layouts, deduplicate, tabulate, write."""
import importlib.util
import io
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import pytest

from care_megatron.config import load_config
from care_megatron.data.dataset import build_records
from care_megatron.data.schema import Record, read_jsonl
from _data_fixtures import chart_image, make_chartqa, make_geometry3k, make_virl39k

TOOL = Path(__file__).resolve().parents[2] / "tools" / "prepare_data.py"


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_data", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _jpeg(image):
    buffer = io.BytesIO()
    image.resize((100, 75), Image.BICUBIC).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def test_prepare_data_end_to_end(tmp_path, capsys):
    tool = _tool()
    make_chartqa(tmp_path / "ChartQA")
    make_geometry3k(tmp_path / "geometry3k")
    make_virl39k(tmp_path / "ViRL39K" / "release.parquet")
    # Another corpus that re-hosts ChartQA's first question with a recompressed, resized chart.
    rows = [{"question": "What is the value of bar 0 ?", "answer": "12", "images": [{"bytes": _jpeg(chart_image(0)), "path": None}]},
            {"question": "A new question", "answer": "5", "images": [{"bytes": _jpeg(chart_image(77)), "path": None}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rehost.parquet")
    out = tmp_path / "mixture"
    code = tool.main(["--chartqa", str(tmp_path / "ChartQA"), "--geometry3k", str(tmp_path / "geometry3k"),
                      "--virl39k", str(tmp_path / "ViRL39K"), "--parquet", str(tmp_path / "rehost.parquet"),
                      "--max-hamming", "6", "--heldout", "3", "--seed", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    table = {line.split()[0]: line.split() for line in printed.splitlines() if line.split()
             and line.split()[0] in ("chartqa", "geometry3k", "virl39k", "rehost", "total")}
    # loaded, skipped, dups, kept, share, paper count
    assert table["chartqa"][1:5] == ["5", "2", "0", "5"] and table["chartqa"][6] == "7,398"
    assert table["geometry3k"][1:5] == ["2", "2", "0", "2"] and table["geometry3k"][6] == "2,101"
    assert table["virl39k"][1:5] == ["3", "1", "0", "3"] and table["virl39k"][6] == "38,870"
    assert table["rehost"][1:5] == ["2", "0", "1", "1"] and table["rehost"][6] == "-"
    assert table["total"][1:5] == ["12", "5", "1", "11"] and table["total"][6] == "48,369"
    assert table["chartqa"][5] == f"{100 * 5 / 11:.1f}%"
    train, report = read_jsonl(out / "train.jsonl")
    heldout, heldout_report = read_jsonl(out / "heldout.jsonl")
    assert report.num_skipped == 0 and heldout_report.num_skipped == 0
    assert (len(train), len(heldout)) == (8, 3) and not {r.id for r in train} & {r.id for r in heldout}
    records = train + heldout
    assert [r.source for r in records].count("virl39k") == 3
    assert "chartqa/train/human/0" in {r.id for r in records} and "rehost/0" not in {r.id for r in records}
    # 3 of 11 in proportion (5, 2, 3, 1 -> 1.36, 0.55, 0.82, 0.27): floors 1, 0, 0, 0 then the two
    # largest remainders (virl39k, geometry3k)
    assert sorted(r.source for r in heldout) == ["chartqa", "geometry3k", "virl39k"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"] == 11 and summary["cross_source_duplicates"] == 1 and summary["duplicates_removed"] == 1
    assert (summary["train"], summary["heldout"]) == (8, 3)

    # What the paper configs read: train on train.jsonl, evaluate on heldout.jsonl.
    config = load_config(None, [f"data.tasks=[jsonl:{out / 'train.jsonl'}]",
                                f"data.eval_tasks=[jsonl:{out / 'heldout.jsonl'}]",
                                "data.train_size=100", "data.eval_size=3"])
    splits = build_records(config.data)
    assert sorted(r.id for r in splits.train) == sorted(r.id for r in train)
    assert sorted(r.id for r in splits.eval) == sorted(r.id for r in heldout)


def _sources(counts):
    return [Record(f"{name}/{i}", name, [], f"{name} q{i}", "1") for name, n in counts.items() for i in range(n)]


def test_split_heldout_is_proportional_seeded_and_disjoint():
    split = _tool().split_heldout
    records = _sources({"a": 50, "b": 30, "c": 20})
    train, heldout = split(records, 10, seed=0)
    assert [r.source for r in heldout].count("a") == 5 and [r.source for r in heldout].count("b") == 3
    assert [r.source for r in heldout].count("c") == 2 and len(train) == 90
    assert not {r.id for r in train} & {r.id for r in heldout}
    assert [r.id for r in train] == [r.id for r in records if r not in heldout]  # input order kept
    assert [r.id for r in split(records, 10, seed=0)[1]] == [r.id for r in heldout]
    assert {tuple(r.id for r in split(records, 10, seed=s)[1]) for s in range(5)} != {tuple(r.id for r in heldout)}
    assert split(records, 0)[1] == []
    # 7 of (8, 4, 2): exactly 4, 2, 1
    assert sorted(r.source for r in split(_sources({"x": 8, "y": 4, "z": 2}), 7)[1]) == ["x"] * 4 + ["y"] * 2 + ["z"]
    with pytest.raises(ValueError, match="--heldout"):
        split(records, 100)


def test_paper_configs_read_what_prepare_data_writes():
    root = Path(__file__).resolve().parents[2]
    tool = _tool()
    for path in sorted((root / "examples" / "configs").glob("qwen*.yaml")):
        config = load_config(path)
        assert config.data.tasks == [f"jsonl:/data/care_mixture/{tool.TRAIN_FILE}"], path.name
        assert config.data.eval_tasks == [f"jsonl:/data/care_mixture/{tool.HELDOUT_FILE}"], path.name


def test_eval_tasks_drop_held_out_records_that_are_also_training_records(tmp_path):
    from care_megatron.data.schema import write_jsonl
    from care_megatron.data.synthetic import generate

    records = generate("count_shapes", 12, seed=5, difficulty=2)
    write_jsonl(records[:8], tmp_path / "train.jsonl")
    write_jsonl(records[7:], tmp_path / "heldout.jsonl")  # records[7] is in both
    config = load_config(None, [f"data.tasks=[jsonl:{tmp_path / 'train.jsonl'}]",
                                f"data.eval_tasks=[jsonl:{tmp_path / 'heldout.jsonl'}]",
                                "data.train_size=8", "data.eval_size=5"])
    splits = build_records(config.data)
    assert sorted(r.id for r in splits.eval) == sorted(r.id for r in records[8:])
    assert [dict(r.skipped) for r in splits.reports if "held-out" in r.source] == [{"also_in_training": 1}]
    with pytest.raises(ValueError, match="data.eval_tasks"):
        build_records(load_config(None, ["data.eval_tasks=[count_cats]"]).data)

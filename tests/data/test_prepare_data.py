"""tools/prepare_data.py: load the three paper sources from their layouts, deduplicate, tabulate, write."""
import importlib.util
import io
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from care_megatron.data.schema import read_jsonl
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
                      "--max-hamming", "6", "--out", str(out)])
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
    records, report = read_jsonl(out / "mixture.jsonl")
    assert report.loaded == 11 and report.num_skipped == 0
    assert [r.source for r in records].count("virl39k") == 3
    assert "chartqa/train/human/0" in {r.id for r in records} and "rehost/0" not in {r.id for r in records}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"] == 11 and summary["cross_source_duplicates"] == 1 and summary["duplicates_removed"] == 1

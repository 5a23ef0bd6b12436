"""maskrcnn-check (maskrcnn/check.py) on the CPU at the tiny config's sizes: the table, the JSON
and the exit status, and a broken op that fails its rows and the command."""

import json

import pytest
import torch

from maskrcnn import check
from maskrcnn.config.flags import FLAGS
from maskrcnn.ops import nms
from tests.tiny import TINY, run_module

CPU_ROWS = ["nms", "proposals", "roi_align", "roi_align_backward", "match", "paste_masks",
            "host_syncs train_step", "host_syncs inference"]


def _flags(*extra: str) -> list[str]:
    return ["--config=shapes", "--device=cpu", *(f"--set={s}" for s in TINY), *extra]


def test_cpu_run_passes_and_writes_json(cache, tmp_path):
    """If this fails, the command a user runs on their own machine fails on a correct CPU
    build, prints no table, or writes rows other than those it printed."""
    out = tmp_path / "check.json"
    result = run_module("maskrcnn.check", *_flags(f"--json_out={out}"), cache_dir=cache)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("op "))
    assert lines[header].split() == ["op", "method", "reference", "largest", "diff",
                                     "tolerance", "ms", "verdict"]
    table = lines[header + 1:header + 1 + len(CPU_ROWS)]
    assert all(line.endswith("PASS") for line in table), "\n".join(table)
    assert f"{len(CPU_ROWS)} of {len(CPU_ROWS)} passed, 0 failed" in lines[-1]
    report = json.loads(out.read_text())
    assert [r["op"] for r in report["rows"]] == CPU_ROWS
    assert [r["method"] for r in report["rows"][:5]] == ["per_cell", "per_cell", "gather",
                                                        "gather", "tiled"]
    assert all(r["ok"] and r["error"] is None for r in report["rows"])
    assert report["failed"] == 0 and report["device"] == "cpu"


@pytest.fixture
def parsed_flags():
    """Parses the command's flags in this process; restores them after."""
    def parse(args: list[str]) -> None:
        FLAGS(["maskrcnn-check", *args])
    yield parse
    FLAGS.unparse_flags()


def test_a_broken_op_fails_its_rows_and_exits_1(monkeypatch, parsed_flags, tmp_path, capsys):
    """If this fails, an NMS that keeps every box passes the check, or the command exits 0
    (or crashes) though a row failed."""
    monkeypatch.setattr(nms, "_nms_per_cell",
                        lambda boxes, cell, iou_threshold: torch.arange(boxes.shape[0]))
    out = tmp_path / "check.json"
    parsed_flags(_flags(f"--json_out={out}"))
    with pytest.raises(SystemExit) as exit_info:
        check.main()
    assert exit_info.value.code == 1
    stdout = capsys.readouterr().out
    verdicts = {line.split()[0]: line.split()[-1] for line in stdout.splitlines()
                if line.split() and line.split()[-1] in ("PASS", "FAIL")}
    assert verdicts["nms"] == "FAIL" and verdicts["proposals"] == "FAIL"
    assert verdicts["roi_align"] == "PASS" and verdicts["match"] == "PASS"
    assert "2 failed" in stdout.splitlines()[-1]
    rows = {r["op"]: r for r in json.loads(out.read_text())["rows"]}
    assert not rows["nms"]["ok"] and rows["nms"]["max_diff"] >= 10

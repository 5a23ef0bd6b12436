"""`maskrcnn-benchmark --loader`: a complete, self-consistent report of the input pipeline's
throughput, on 3 real COCO photos at the COCO recipe's sizes."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.tiny import REPO

COCO = REPO / "tests" / "assets" / "coco2017-tiny"
STAGES = ["decode", "resize", "flip + pad", "targets", "collate"]


def _three_images(root):
    """A COCO json of the first 3 annotated val2017 photos (2 landscape, 1 portrait: both
    canvases), with their annotations."""
    data = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
    annotated = {a["image_id"] for a in data["annotations"] if not a["iscrowd"]}
    landscape = [i for i in data["images"] if i["id"] in annotated and i["width"] > i["height"]]
    portrait = [i for i in data["images"] if i["id"] in annotated and i["width"] < i["height"]]
    images = landscape[:2] + portrait[:1]
    ids = {i["id"] for i in images}
    data.update(images=images, annotations=[a for a in data["annotations"]
                                            if a["image_id"] in ids])
    path = root / "three.json"
    path.write_text(json.dumps(data))
    return path


def _run(*flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "maskrcnn.benchmark", "--loader", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny --loader run at the 8x4 config's sizes: (stdout, the JSON report)."""
    root = tmp_path_factory.mktemp("loader")
    result = _run("--config=8x4", f"--train_json={_three_images(root)}",
                  f"--train_images={COCO / 'val2017'}", "--steps=2", "--warmup=1",
                  "--loader_rounds=2", "--loader_workers=1,2",
                  f"--json_out={root / 'report.json'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads((root / "report.json").read_text())


def test_report_measures_every_stage_and_worker_count(run):
    """If this fails, a stage or worker count is missing from the report, or a rate is not a
    positive finite number (a timer or the loader loop is broken), or the run did not use the
    COCO recipe's sizes."""
    _, report = run
    setup = report["setup"]
    assert setup["dataset_images"] == 3 and setup["canvases"] == [[800, 1344], [1344, 800]]
    assert (setup["short_side"], setup["max_long_side"], setup["gt_slots"],
            setup["gt_mask_size"], setup["images_per_batch"]) == (800, 1333, 100, 64, 4)
    assert [row["stage"] for row in report["stages"]] == STAGES
    for row in report["stages"]:
        assert 0 < row["ms"] < 1e4, row
        assert (row["reference_ms"] is None) == (row["stage"] != "resize"), row
    assert [row["workers"] for row in report["loader"]] == [1, 2]
    for record in [report["in_process"], *report["loader"]]:
        rates = record["images_per_s"]
        assert all(math.isfinite(v) and v > 0 for v in rates.values()), record
        assert rates["min"] <= rates["median"] <= rates["max"]
    assert report["environment"]["load_average_end"] >= 0


def test_per_worker_rates_and_workers_needed_follow_from_the_rates(run):
    """If this fails, the per-worker rate is not the loader's rate over its workers, the
    warm-up does not cover 2 batches per worker, or the workers one GPU needs do not follow
    from the first worker count's per-worker rate."""
    _, report = run
    for row in report["loader"]:
        assert row["images_per_s_per_worker"] == pytest.approx(
            row["images_per_s"]["median"] / row["workers"])
        assert row["warmup_batches"] == max(1, 2 * row["workers"])
    gpu = report["gpu"]
    assert gpu["images_per_s"] == 185 and gpu["at_workers"] == 1
    assert gpu["workers_needed"] == math.ceil(
        185 / report["loader"][0]["images_per_s_per_worker"])


def test_printed_report_has_the_tables(run):
    """If this fails, the printed report lost a line the JSON has."""
    stdout, report = run
    for text in [*STAGES, "PIL ref", "in-process samples + collate", "training DataLoader, 1 "
                 "worker", "training DataLoader, 2 workers", "one GPU at 185 images/s needs",
                 "load average"]:
        assert text in stdout, text
    assert report["command"].startswith("maskrcnn-benchmark --loader")


def test_bad_worker_counts_are_a_one_line_error():
    """If this fails, a bad --loader_workers value gives a traceback (or is accepted)
    instead of one line naming the flag."""
    result = _run("--config=8x4", "--loader_workers=1,x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --loader_workers=1,x: must be a comma-separated list of positive worker counts"]

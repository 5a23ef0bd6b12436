"""The eval and predict commands on a trained checkpoint that scores well above AP 0 (the
checked-in tests/assets/shapes-tiny, tests/shapes_checkpoint.py)."""

import json
import re
from pathlib import Path

import pytest

from maskrcnn.data.loader import resolve_data_paths
from tests.shapes_checkpoint import config, scores, write_checkpoint
from tests.tiny import run_module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("shapes") / "step.pt")


def _ap(text):
    found = re.search(r"box AP ([\d.]+), mask AP ([\d.]+)", text)
    assert found, text[-3000:]
    return float(found.group(1)), float(found.group(2))


@pytest.fixture(scope="module")
def val_json(cache) -> Path:
    """The checkpoint's synthetic val split (generated into the cache as eval would)."""
    return resolve_data_paths(config()).val_json


def _evaluate(checkpoint, output_dir, cache, *flags):
    result = run_module("maskrcnn.eval", f"--checkpoint={checkpoint}",
                        f"--output_dir={output_dir}", *flags, cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_eval_scores_the_checkpoint_as_training_did(checkpoint, val_json, cache, tmp_path):
    """If this fails, `eval --checkpoint` rebuilds the model or the data differently from the
    run that wrote the checkpoint (its AP differs from the one training printed: box 0.307,
    mask 0.217; with the body drawn from another seed eval scored 0.064 / 0.049), or the
    results file it writes does not hold what it scored."""
    stdout = _evaluate(checkpoint, tmp_path, cache, "--per_category")
    trained = scores()
    assert min(trained) > 0.2, trained
    assert _ap(stdout) == trained
    assert re.search(r"^bbox( +-?\d\.\d{3}){12}$", stdout, re.M)
    assert re.search(r"^segm( +-?\d\.\d{3}){12}$", stdout, re.M)
    assert "segm AP per category: circle" in stdout
    results_file = tmp_path / "coco_results.json"
    results = json.loads(results_file.read_text())
    assert all({"image_id", "category_id", "bbox", "score", "segmentation"} <= r.keys()
               for r in results)
    # The file alone, scored by `eval --results` (full precision), gives training's AP.
    scored = run_module("maskrcnn.eval", f"--results={results_file}",
                        f"--val_json={val_json}", cache_dir=cache)
    assert scored.returncode == 0, scored.stderr[-3000:]
    found = re.search(r"bbox AP ([\d.e-]+), segm AP ([\d.e-]+)$", scored.stdout, re.M)
    assert tuple(float(f"{float(ap):.3f}") for ap in found.groups()) == trained, scored.stdout


@pytest.mark.parametrize("flags", [
    # Another input size than the one trained: the same weights on 2/3-size images.
    ["--set=data { short_side: 64 max_long_side: 96 }"],
    # The RoI heads' score threshold raised: fewer detections.
    ["--set=model { roi_heads { test_score_threshold: 0.5 } }"],
], ids=["input_size", "score_threshold"])
def test_eval_with_another_config_scores_differently(checkpoint, cache, tmp_path, flags):
    """If this fails, the AP the test above compares does not depend on the config eval
    builds the model and data with, so its equality would not show that eval rebuilt them as
    training had."""
    stdout = _evaluate(checkpoint, tmp_path, cache, *flags)
    box, mask = _ap(stdout)
    trained_box, trained_mask = scores()
    assert box != trained_box and mask != trained_mask


# What the checked-in model finds in its 16 val images (55 shapes): a detection scoring at least
# MIN_SCORE with the class of a shape and IoU > 0.5 with it finds it. Measured: 48 of 55
# shapes found; 49 of the 166 detections scoring >= 0.15 right.
MIN_SCORE, MIN_FOUND, MIN_RIGHT = 0.15, 0.7, 0.2


def _iou(a, b):
    """IoU of two COCO boxes (x, y, width, height)."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_predict_finds_the_shapes_of_val_images(checkpoint, val_json, cache, tmp_path):
    """If this fails, predict draws or writes other detections than the model makes: the
    shapes drawn in the synthetic val images (whose ground truth is known) are not found
    with their class and box (with the body drawn from another seed: 15 of 55 found), or the
    files are missing."""
    images = val_json.parents[1] / "val2017"
    result = run_module("maskrcnn.predict", f"--checkpoint={checkpoint}", f"--input={images}",
                        f"--output_dir={tmp_path}", "--draw_threshold=0", cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.stem for p in images.iterdir())
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == names
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions["images"]) == len(names)
    assert [c["name"] for c in predictions["categories"]][:2] == ["circle", "square"]
    assert all("segmentation" in a and "score" in a for a in predictions["annotations"])

    truth = json.loads(val_json.read_text())
    file_of = {i["id"]: Path(i["file_name"]).name for i in truth["images"]}
    gt = [(file_of[a["image_id"]], a["category_id"], a["bbox"])
          for a in truth["annotations"] if not a["iscrowd"]]
    file_of = {i["id"]: Path(i["file_name"]).name for i in predictions["images"]}
    confident = [(file_of[a["image_id"]], a["category_id"], a["bbox"])
                 for a in predictions["annotations"] if a["score"] >= MIN_SCORE]

    def matched(instance, others):
        return any(o[0] == instance[0] and o[1] == instance[1] and _iou(o[2], instance[2]) > 0.5
                   for o in others)

    found = sum(matched(g, confident) for g in gt)
    right = sum(matched(p, gt) for p in confident)
    assert found >= MIN_FOUND * len(gt), f"{found} of {len(gt)} shapes found"
    assert right >= MIN_RIGHT * len(confident), f"{right} of {len(confident)} detections right"


@pytest.mark.parametrize("module, flags, message", [
    ("maskrcnn.eval", ["--checkpoint=/nonexistent.pt"], "cannot read checkpoint /nonexistent.pt"),
    ("maskrcnn.eval", [], "--checkpoint (or --results) is required"),
    ("maskrcnn.predict", ["--input=/nonexistent"], "/nonexistent: no such file or folder"),
])
def test_bad_input_is_one_line(checkpoint, cache, module, flags, message):
    if module == "maskrcnn.predict":
        flags = [f"--checkpoint={checkpoint}", *flags]
    result = run_module(module, *flags, cache_dir=cache)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]


def test_explicit_val_file_replaces_the_synthetic_val_split(cache, tmp_path):
    """If this fails, --val_json/--val_images on a synthetic-data config (e.g. maskrcnn-eval
    of a shapes checkpoint on the user's own file) are silently ignored and the synthetic val
    split is scored instead."""
    own = tmp_path / "val.json"
    with_val = config()
    with_val.data.val_json, with_val.data.val_images = str(own), str(tmp_path)
    paths = resolve_data_paths(with_val)
    assert (paths.val_json, paths.val_images) == (own, tmp_path)
    assert paths.train_json == resolve_data_paths(config()).train_json  # still synthetic

"""The eval and predict commands on a checkpoint of a tiny training run."""

import json
import re

import pytest

from tests.tiny import run_module, tiny_flags

SHORT = "solver { epochs: 1 images_per_epoch: 4 warmup_steps: 1 lr_decay_epochs: [1] }"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """(output dir, train stdout) of a 2-step tiny run."""
    out = tmp_path_factory.mktemp("run")
    result = run_module("maskrcnn.train", *tiny_flags(out, SHORT), cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def _ap(text):
    found = re.search(r"box AP ([\d.]+), mask AP ([\d.]+)", text)
    return float(found.group(1)), float(found.group(2))


def test_eval_scores_a_checkpoint_as_training_did(trained, cache, tmp_path):
    """If this fails, `eval --checkpoint` rebuilds the model or the data differently from the
    run that wrote the checkpoint (its AP differs from the one training printed)."""
    out, train_stdout = trained
    checkpoint = out / "checkpoints" / "step_00000002.pt"
    result = run_module("maskrcnn.eval", f"--checkpoint={checkpoint}", "--per_category",
                        f"--output_dir={tmp_path}", cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _ap(result.stdout) == _ap(train_stdout)
    assert re.search(r"^bbox( +-?\d\.\d{3}){12}$", result.stdout, re.M)
    assert re.search(r"^segm( +-?\d\.\d{3}){12}$", result.stdout, re.M)
    assert "segm AP per category: circle" in result.stdout
    results = json.loads((tmp_path / "coco_results.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score", "segmentation"} <= r.keys()
               for r in results)


def test_predict_draws_images_and_writes_coco_json(trained, cache, tmp_path):
    out, _ = trained
    images = next(cache.glob("synthetic-*")) / "val2017"
    checkpoint = out / "checkpoints" / "step_00000002.pt"
    result = run_module("maskrcnn.predict", f"--checkpoint={checkpoint}", f"--input={images}",
                        f"--output_dir={tmp_path}", "--draw_threshold=0", cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.stem for p in images.iterdir())
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == names
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions["images"]) == len(names)
    assert [c["name"] for c in predictions["categories"]][:2] == ["circle", "square"]
    assert all("segmentation" in a and "score" in a for a in predictions["annotations"])


@pytest.mark.parametrize("module, flags, message", [
    ("maskrcnn.eval", ["--checkpoint=/nonexistent.pt"], "cannot read checkpoint /nonexistent.pt"),
    ("maskrcnn.eval", [], "--checkpoint (or --results) is required"),
    ("maskrcnn.predict", ["--input=/nonexistent"], "/nonexistent: no such file or folder"),
])
def test_bad_input_is_one_line(trained, cache, module, flags, message):
    out, _ = trained
    if module == "maskrcnn.predict":
        flags = [f"--checkpoint={out / 'checkpoints' / 'step_00000002.pt'}", *flags]
    result = run_module(module, *flags, cache_dir=cache)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]

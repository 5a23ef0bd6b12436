"""Hand-made annotation files with faults, through the commands: `maskrcnn-train` with the
faults in its train and its val file, `maskrcnn-eval` with them in the val file. By default
each faulty annotation is dropped, named in a warning and counted in the statistics, and the
run ends normally; `data { bad_annotations: ERROR }` stops it with one line (exit status 2).
The reader's handling of each fault alone is in tests/data/test_coco.py."""

import json
import re
from pathlib import Path

import pytest

from maskrcnn.data.coco import (
    BAD_BOX,
    BAD_RLE,
    EMPTY_BOX,
    EMPTY_SEGMENTATION,
    ODD_POLYGON,
    SHORT_POLYGON,
)
from maskrcnn.data.loader import resolve_data_paths
from tests.shapes_checkpoint import config, scores, write_checkpoint
from tests.tiny import REPO, run_module, tiny_flags

REAL = REPO / "tests" / "assets" / "coco2017-tiny"
IMAGES = REAL / "val2017"
ERROR_SET = "--set=data { bad_annotations: ERROR }"


def add_faults(data: dict) -> dict:
    """data with a faulty annotation of each kind added on its first image (next to its
    sound ones, which stay as they were) and one faulty polygon added to its first polygon
    annotation; returns {reason: id of its faulty annotation}."""
    image = data["images"][0]
    sound = next(a for a in data["annotations"]
                 if isinstance(a["segmentation"], list) and not a.get("iscrowd"))
    next_id = max(a["id"] for a in data["annotations"]) + 1
    faults = {
        EMPTY_BOX: {"bbox": [10, 10, -5, 10]},
        BAD_BOX: {"bbox": [10, float("nan"), 5, 10]},
        SHORT_POLYGON: {"segmentation": [[10, 10, 20, 20]]},
        EMPTY_SEGMENTATION: {"segmentation": []},
        BAD_RLE: {"segmentation": {"counts": "5o", "size": [image["height"], image["width"]]}},
    }
    ids = {}
    for offset, (reason, fields) in enumerate(faults.items()):
        ids[reason] = next_id + offset
        data["annotations"].append({
            "id": ids[reason], "image_id": image["id"], "category_id": sound["category_id"],
            "iscrowd": 0, "area": 50.0, "bbox": [10, 10, 5, 10],
            "segmentation": [[10, 10, 15, 10, 15, 20, 10, 20]], **fields})
    sound["segmentation"] = [*sound["segmentation"], [1, 2, 3, 4, 5]]  # odd: this one dropped
    ids[ODD_POLYGON] = sound["id"]
    return ids


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _check_named(stdout: str, json_path: Path, split: str, ids: dict) -> None:
    """The warning names the file and the first faulty annotations (id, image, reason), and
    the split's statistics count every fault by reason."""
    warning = next((line for line in stdout.splitlines()
                    if line.startswith(f"warning: {json_path}: dropped 5 of ")), None)
    assert warning, stdout[-3000:]
    assert re.search(rf"annotation {ids[EMPTY_BOX]} \(image \d+\): {EMPTY_BOX}", warning)
    stats = stdout[stdout.index(f"{split}: {json_path}\n"):]
    counts = re.search(r"faulty annotations dropped: 5 \((.*)\)\n", stats).group(1)
    for reason in (EMPTY_BOX, BAD_BOX, SHORT_POLYGON, EMPTY_SEGMENTATION, BAD_RLE):
        assert f"{reason}: 1" in counts, counts
    assert f"faulty polygons dropped from annotations kept: 1 ({ODD_POLYGON}: 1)" in stats


def _one_line_error(result, json_path: Path, annotation_id: int) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: annotation file {json_path}: annotation "
                               f"{annotation_id} (image "), lines[0]
    assert "(data.bad_annotations is ERROR)" in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("shapes") / "step.pt")


@pytest.fixture(scope="module")
def faulty_val(cache, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(json, images, {reason: annotation id}): the checked-in model's synthetic val split
    with a faulty annotation of each kind added and a faulty polygon added to one."""
    paths = resolve_data_paths(config())
    data = json.loads(paths.val_json.read_text())
    ids = add_faults(data)
    return _write(tmp_path_factory.mktemp("val") / "faulty.json", data), paths.val_images, ids


def _eval_flags(checkpoint: Path, json_path: Path, images: Path, output_dir: Path) -> list:
    # The checkpoint's config trains on the synthetic set, whose paths win over a --val_json
    # given without --train_json (data/loader.py: resolve_data_paths); eval reads only val.
    return [f"--checkpoint={checkpoint}", f"--output_dir={output_dir}",
            *(f"--{split}_json={json_path}" for split in ("train", "val")),
            *(f"--{split}_images={images}" for split in ("train", "val"))]


def test_eval_scores_a_faulty_val_file_as_its_sound_part(checkpoint, faulty_val, cache,
                                                        tmp_path):
    """If this fails, `maskrcnn-eval` on a val file with faulty annotations (a 2-point
    polygon, an empty polygon list...) ends in a pycocotools traceback, scores against
    something else than the sound annotations (the AP differs from the one the model scored
    on the file without the faults: box 0.307, mask 0.217), or drops them silently; or
    `maskrcnn-eval --results` scores the results it wrote differently against that file."""
    json_path, images, ids = faulty_val
    result = run_module("maskrcnn.eval", *_eval_flags(checkpoint, json_path, images, tmp_path),
                        cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_named(result.stdout, json_path, "val", ids)
    found = re.search(r"box AP ([\d.]+), mask AP ([\d.]+)", result.stdout)
    assert (float(found.group(1)), float(found.group(2))) == scores()
    # Its results file scored by `eval --results` against the same faulty file: the same AP.
    scored = run_module("maskrcnn.eval", f"--results={tmp_path / 'coco_results.json'}",
                        f"--val_json={json_path}", cache_dir=cache)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert f"warning: {json_path}: dropped 5 of " in scored.stdout
    found = re.search(r"bbox AP ([\d.e-]+), segm AP ([\d.e-]+)$", scored.stdout, re.M)
    assert tuple(float(f"{float(ap):.3f}") for ap in found.groups()) == scores()


def test_eval_stops_on_a_faulty_val_file_under_error(checkpoint, faulty_val, cache, tmp_path):
    """If this fails, `maskrcnn-eval` with data.bad_annotations ERROR scores a val file with
    faulty annotations, or stops without one line naming the file, annotation and fault."""
    json_path, images, ids = faulty_val
    result = run_module("maskrcnn.eval", *_eval_flags(checkpoint, json_path, images, tmp_path),
                        ERROR_SET, cache_dir=cache)
    # The first fault in the file: the odd polygon added to a sound annotation.
    line = _one_line_error(result, json_path, ids[ODD_POLYGON])
    assert "a polygon needs an even number of coordinates, not 5" in line


@pytest.fixture(scope="module")
def faulty_real(tmp_path_factory) -> tuple[Path, dict, Path, dict, Path]:
    """(train json, its fault ids, val json, its fault ids, sound json): 4 real photos of
    tests/assets with a few instances each, with a faulty annotation of each kind and a
    duplicate annotation id in the train file, the same faults in the val file, and none in
    the sound file."""
    data = json.loads((REAL / "annotations" / "instances_val2017.json").read_text())
    counts: dict[int, int] = {}
    for ann in data["annotations"]:
        counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + (not ann["iscrowd"])
    images = sorted((i for i in data["images"] if counts.get(i["id"])),
                    key=lambda i: (counts[i["id"]], i["id"]))[:4]
    keep = {i["id"] for i in images}
    root = tmp_path_factory.mktemp("real")
    files = []
    for split in ("train", "val", "sound"):
        subset = {**data, "images": images,
                  "annotations": [dict(a) for a in data["annotations"] if a["image_id"] in keep]}
        if split != "sound":
            ids = add_faults(subset)
            if split == "train":
                subset["annotations"].append(dict(subset["annotations"][0]))
        files += [_write(root / f"{split}.json", subset), ids]
    return tuple(files[:5])


def _train(train_json: Path, val_json: Path, output_dir: Path, *extra: str):
    return run_module("maskrcnn.train", *tiny_flags(
        output_dir, "model { num_classes: 80 }",
        "solver { epochs: 1 images_per_epoch: 4 lr_decay_epochs: [1] }", *extra),
        f"--train_json={train_json}", f"--train_images={IMAGES}", f"--val_json={val_json}",
        f"--val_images={IMAGES}", cache_dir=output_dir)


def test_train_drops_faulty_annotations_of_both_files(faulty_real, tmp_path):
    """If this fails, `maskrcnn-train` stops on faulty annotations in its train file, or
    trains and then ends in a pycocotools traceback on those of its val file, or drops them
    without naming them in a warning and the train and val statistics, or loses an
    annotation that shares another's id."""
    train_json, train_ids, val_json, val_ids, _ = faulty_real
    result = _train(train_json, val_json, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_named(result.stdout, train_json, "train", train_ids)
    _check_named(result.stdout, val_json, "val", val_ids)
    assert f"warning: {train_json}: 1 annotation(s) reuse an id" in result.stdout
    assert "duplicate annotation ids renumbered: 1" in result.stdout
    assert re.search(r"box AP [\d.]+, mask AP [\d.]+", result.stdout)


@pytest.mark.parametrize("split", ["train", "val"])
def test_train_stops_on_a_faulty_file_under_error(faulty_real, tmp_path, split):
    """If this fails, `maskrcnn-train` with data.bad_annotations ERROR trains on a train or
    val file with faulty annotations, or stops without one line naming the file, annotation
    and fault (or only after training)."""
    train_json, train_ids, val_json, val_ids, sound = faulty_real
    faulty, ids = (train_json, train_ids) if split == "train" else (val_json, val_ids)
    result = _train(faulty if split == "train" else sound, faulty if split == "val" else sound,
                    tmp_path, "data { bad_annotations: ERROR }")
    line = _one_line_error(result, faulty, ids[ODD_POLYGON])
    assert "a polygon needs an even number of coordinates, not 5" in line
    assert not (tmp_path / "checkpoints").exists()

"""Hand-made annotation files with faults, through the commands: `maskrcnn-eval` with the
faults in its val file. By default each faulty annotation is dropped, named in a warning and
counted in the statistics, and the run ends normally; `data { bad_annotations: ERROR }` stops
it with one line (exit status 2). The reader's handling of each fault alone is in
tests/data/test_coco.py."""

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
from tests.tiny import run_module

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

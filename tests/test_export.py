"""maskrcnn-export: the checked-in trained model (tests/assets/shapes-tiny) exported as one
program in each format, loaded in a fresh process that never imports our package, equals the
eager model on synthetic shapes; maskrcnn-predict --model draws the same predictions as from
the checkpoint."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskrcnn.data.synthetic import generate_synthetic_coco
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine import deploy
from maskrcnn.engine.predictions import predict
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.runtime import Runtime
from tests.shapes_checkpoint import config, write_checkpoint
from tests.tiny import run_module

# What "equal to eager" allows (measured differences: docs/deploy.md): boxes in the image's
# pixels, scores as probabilities, masks by IoU of the pasted binary masks.
BOX_TOLERANCE = 0.01
SCORE_TOLERANCE = 1e-4
MIN_MASK_IOU = 0.99
BATCH = 2
CANVAS = (96, 128)  # the checkpoint's first canvas: the export's default

# A user's program: reads the files maskrcnn-export wrote with torch (or onnxruntime) alone,
# runs the images through it and pastes the masks with the helper written beside it.
LOADER = r"""
import importlib.util, json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
fmt, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
info = json.loads(Path(path + ".json").read_text())
spec = importlib.util.spec_from_file_location("helper", Path(path).parent / "paste_masks.py")
helper = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helper)
images = [np.asarray(Image.open(p).convert("RGB")) for p in sys.argv[4:]]
prepared = [helper.prepare(i, info["canvas"], info["short_side"], info["max_long_side"])
            for i in images]
batch = torch.stack([p for p, _ in prepared])
sizes = torch.tensor([s for _, s in prepared])
torch.set_grad_enabled(False)
if fmt == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(path)
    outputs = [torch.from_numpy(o) for o in session.run(
        None, {"images": batch.numpy(), "image_sizes": sizes.numpy()})]
elif fmt == "pt2":
    outputs = torch.export.load(path).module()(batch, sizes)
else:
    outputs = torch._inductor.aoti_load_package(path)(batch, sizes)
boxes, scores, classes, valid, masks = outputs
found = {}
for i, image in enumerate(images):
    height, width = image.shape[:2]
    keep = valid[i]
    scale = torch.tensor([width / sizes[i, 1], height / sizes[i, 0]] * 2)
    box = boxes[i][keep] * scale
    pasted = helper.paste_masks(masks[i][keep][None], box[None], height, width)[0]
    found[f"boxes{i}"] = box.numpy()
    found[f"scores{i}"] = scores[i][keep].numpy()
    found[f"classes{i}"] = np.array([info["category_ids"][c - 1] for c in classes[i][keep]])
    found[f"masks{i}"] = (pasted >= info["mask_threshold"]).numpy()
np.savez(out, **found)
assert "maskrcnn" not in sys.modules, "the program needed our package"
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("shapes") / "step.pt")


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory) -> list[Path]:
    """Two synthetic val images of the sizes the checkpoint was trained on."""
    root = generate_synthetic_coco(tmp_path_factory.mktemp("synthetic"), seed=3, num_train=0,
                                   num_val=BATCH, min_side=96, max_side=128)
    return sorted((root / "val2017").iterdir())


@pytest.fixture(scope="module")
def eager(checkpoint, image_paths) -> list[list[dict]]:
    """The eager model's COCO results per image (the CPU's own code path: trimmed slots,
    torchvision's NMS), at the export's canvas."""
    state = ckpt.load(checkpoint)
    at_canvas = deploy.at_canvas(config(), CANVAS)
    model = build_model(at_canvas, Runtime.for_device("cpu"))
    model.load_state_dict(state["model"])
    results = predict(model, image_paths, at_canvas, torch.device("cpu"), state["category_ids"])
    assert sum(len(r) for _, r in results) >= 10  # enough detections to compare
    return [r for _, r in results]


@pytest.fixture(scope="module")
def program(checkpoint):
    """The ExportedProgram of the checkpoint at BATCH images on the canvas, its inputs, the
    checkpoint and the model it was traced from."""
    state = ckpt.load(checkpoint)
    model = build_model(deploy.at_canvas(config(), CANVAS), Runtime.gpu_path())
    model.load_state_dict(state["model"])
    inputs = deploy.example_inputs(deploy.at_canvas(config(), CANVAS), CANVAS, BATCH,
                                   torch.device("cpu"))
    return deploy.export_program(model, inputs), inputs, state, model


def _write(program, fmt, directory: Path) -> Path:
    exported, inputs, state, model = program
    if fmt == "onnx":  # traced with ROIAlign as row gathers, as maskrcnn-export does
        exported = deploy.export_program(model, inputs, onnx=True)
    path = directory / {"pt2": "model.pt2", "aoti": "model-aoti.pt2", "onnx": "model.onnx"}[fmt]
    deploy.save(exported, fmt, path, inputs)
    info = deploy.metadata(deploy.at_canvas(config(), CANVAS), fmt, BATCH, "cpu",
                           state["category_ids"], state["class_names"])
    Path(f"{path}.json").write_text(json.dumps(info))
    deploy.write_helper(directory)
    return path


def _run_alone(fmt, path, image_paths, tmp_path) -> dict:
    """The loader's outputs, from a fresh interpreter that never imports maskrcnn."""
    out = tmp_path / "found.npz"
    result = subprocess.run([sys.executable, "-c", LOADER, fmt, str(path), str(out),
                             *map(str, image_paths)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(out))


def _assert_equal_to_eager(found: dict, eager: list[list[dict]]):
    for i, results in enumerate(eager):
        classes = [r["category_id"] for r in results]
        assert found[f"classes{i}"].tolist() == classes, f"image {i}"
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in results)])
        assert np.abs(found[f"boxes{i}"] - boxes.reshape(-1, 4)).max(initial=0) <= BOX_TOLERANCE
        scores = np.array([r["score"] for r in results])
        assert np.abs(found[f"scores{i}"] - scores).max(initial=0) <= SCORE_TOLERANCE
        for mask, r in zip(found[f"masks{i}"], results, strict=True):
            truth = mask_utils.decode(r["segmentation"]).astype(bool)
            union = (mask | truth).sum()
            assert union == 0 or (mask & truth).sum() / union >= MIN_MASK_IOU


def test_program_names_no_op_of_ours(program):
    """If this fails, the exported program still calls a `maskrcnn::` op (it could not load
    without our package), or the export no longer takes uint8 images and their sizes."""
    exported = program[0]
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "maskrcnn" in t]
    assert "aten.embedding_bag.padding_idx" in targets  # the gather ROIAlign, traced through
    placeholders = [n.meta["val"] for n in exported.graph.nodes if n.op == "placeholder"]
    user_inputs = placeholders[-2:]
    assert [(v.dtype, tuple(v.shape)) for v in user_inputs] == [
        (torch.uint8, (BATCH, 3, *CANVAS)), (torch.int64, (BATCH, 2))]


def test_graph_does_not_grow_with_the_nms_candidates(checkpoint):
    """If this fails, the exported NMS unrolls into steps per candidate again (the "torch"
    loop traced as is): at COCO sizes (1000 RPN candidates per level, 5000 detection
    candidates) the graph would hold tens of thousands of nodes, and export and AOTInductor
    compilation would take hours. Two exports whose candidate counts differ tenfold must have
    about the same number of nodes (levels with fewer anchors than the top-k are padded by
    a node or two; an unrolled loop adds several nodes per candidate), and NMS must be a
    while_loop."""
    state = ckpt.load(checkpoint)
    sizes = {}
    for topk in (20, 200):
        at = deploy.at_canvas(config(), CANVAS)
        at.model.rpn.pre_nms_topk_test = topk
        model = build_model(at, Runtime.gpu_path())
        model.load_state_dict(state["model"])
        exported = deploy.export_program(model, deploy.example_inputs(at, CANVAS, 1,
                                                                      torch.device("cpu")))
        sizes[topk] = len(exported.graph.nodes)
        targets = [str(node.target) for node in exported.graph.nodes]
        assert targets.count("while_loop") == 2, targets  # the RPN's and the detections'
    assert abs(sizes[20] - sizes[200]) < 10, sizes


def test_trimmed_masks_program_equals_the_static_one(checkpoint, image_paths):
    """If this fails, `--trim_masks` (the mask head on the used detection slots only, a
    data-dependent size) changes the detections or masks, or cannot be exported: it must
    give the static program's outputs, on images with detections and on blank ones."""
    from PIL import Image  # noqa: PLC0415

    state = ckpt.load(checkpoint)
    at = deploy.at_canvas(config(), CANVAS)
    helper = {}
    exec(deploy.helper_source(), helper)  # noqa: S102 (our own generated module)
    prepared = [helper["prepare"](np.asarray(Image.open(p).convert("RGB")), CANVAS,
                                  at.data.short_side, at.data.max_long_side)
                for p in image_paths]
    images = torch.stack([image for image, _ in prepared])
    sizes = torch.tensor([size for _, size in prepared])
    programs = []
    for trim in (False, True):
        model = build_model(at, deploy.export_runtime(trim))
        model.load_state_dict(state["model"])
        exported = deploy.export_program(model, (images, sizes))
        # The trimmed program reads its slot count from the data (one scalar read); the
        # static one reads none.
        reads = [n for n in exported.graph.nodes
                 if str(n.target) in ("aten.item.default", "aten._local_scalar_dense.default")]
        assert len(reads) == trim, reads
        programs.append(exported.module())
    most = []
    for batch in (images, torch.zeros_like(images)):
        static, trimmed = (dict(zip(deploy.OUTPUTS, program(batch, sizes), strict=True))
                           for program in programs)
        for name in deploy.OUTPUTS:
            torch.testing.assert_close(trimmed[name], static[name], rtol=0, atol=1e-6)
        most.append(int(static["valid"].sum(1).max()))
    # Detections on both batches, fewer than D (so fewer slots ran), and not as many (two
    # different trimmed sizes of the one program).
    d = static["valid"].shape[1]
    assert 0 < most[0] < d and 0 < most[1] < d and most[0] != most[1], most


@pytest.fixture(scope="module")
def run_exported(program, image_paths, tmp_path_factory):
    """fmt -> the loader's outputs for the program written in that format (once each)."""
    found = {}

    def run(fmt: str) -> dict:
        if fmt not in found:
            directory = tmp_path_factory.mktemp(fmt)
            found[fmt] = _run_alone(fmt, _write(program, fmt, directory), image_paths,
                                    directory)
        return found[fmt]
    return run


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_exported_file_alone_equals_eager(run_exported, fmt, eager):
    """If this fails, a program loaded with torch (pt2) or onnxruntime (onnx) alone, and the
    helper written beside it, finds other detections than the eager model on the same images:
    other classes or order, boxes or scores beyond the tolerances, masks below IoU 0.99; or
    the file needs our package to load."""
    _assert_equal_to_eager(run_exported(fmt), eager)


def test_the_equality_can_fail(run_exported, eager):
    """If this fails, the comparison above would pass a program whose scores are off: the
    eager results with one score moved by 0.001, or one mask cut by half, no longer match
    the program's."""
    moved = [[dict(r) for r in results] for results in eager]
    moved[0][0]["score"] += 0.001
    with pytest.raises(AssertionError):
        _assert_equal_to_eager(run_exported("pt2"), moved)
    cut = [[dict(r) for r in results] for results in eager]
    mask = mask_utils.decode(cut[0][0]["segmentation"])
    rows = np.flatnonzero(mask.any(1))
    mask[: (rows[0] + rows[-1]) // 2] = 0  # the upper half of the shape
    cut[0][0]["segmentation"] = mask_utils.encode(np.asfortranarray(mask))
    with pytest.raises(AssertionError):
        _assert_equal_to_eager(run_exported("pt2"), cut)


def test_aoti_package_alone_equals_eager(run_exported, eager):
    """If this fails, the AOTInductor package (compiled C++ of the same program) loaded with
    torch alone finds other detections than the eager model (see the test above)."""
    began = time.perf_counter()
    found = run_exported("aoti")
    print(f"aoti compile and run: {time.perf_counter() - began:.0f} s")
    _assert_equal_to_eager(found, eager)


def test_command_and_predict_from_the_exported_file(checkpoint, image_paths, cache, tmp_path):
    """If this fails, `maskrcnn-export` does not write the program and its files, or
    `maskrcnn-predict --model` writes other predictions from it than from the checkpoint at
    the same canvas (one image at a time: each call padded to the program's batch)."""
    model = tmp_path / "model.pt2"
    result = run_module("maskrcnn.export", f"--checkpoint={checkpoint}", "--format=pt2",
                        f"--batch={BATCH}", f"--output={model}", cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert model.is_file() and (tmp_path / "paste_masks.py").is_file()
    info = json.loads(Path(f"{model}.json").read_text())
    assert info["canvas"] == list(CANVAS) and info["batch"] == BATCH
    predictions = {}
    for source in (f"--model={model}", f"--checkpoint={checkpoint}"):
        out = tmp_path / source.split("=")[0].strip("-")
        flags = [source, f"--input={image_paths[0].parent}", f"--output_dir={out}"]
        if "checkpoint" in source:  # the program's one canvas
            flags.append(f"--set=data {{ canvas {{ height: {CANVAS[0]} width: {CANVAS[1]} }} }}")
        result = run_module("maskrcnn.predict", *flags, cache_dir=cache)
        assert result.returncode == 0, result.stderr[-3000:]
        predictions[source] = json.loads((out / "predictions.json").read_text())
    from_model, from_checkpoint = predictions.values()
    assert len(from_model["annotations"]) == len(from_checkpoint["annotations"]) >= 10
    for a, b in zip(from_model["annotations"], from_checkpoint["annotations"], strict=True):
        assert a["category_id"] == b["category_id"] and a["image_id"] == b["image_id"]
        assert abs(a["score"] - b["score"]) <= SCORE_TOLERANCE
        assert np.abs(np.array(a["bbox"]) - b["bbox"]).max() <= 2 * BOX_TOLERANCE
        assert mask_utils.iou([a["segmentation"]], [b["segmentation"]], [0])[0, 0] >= MIN_MASK_IOU


@pytest.mark.parametrize("module, flags, message", [
    ("maskrcnn.export", ["--format=pt2", "--output=/tmp/x.pt2"], "--checkpoint is required"),
    ("maskrcnn.export", ["--canvas=100x7"], "--canvas=100x7: height and width must be"),
    ("maskrcnn.export", ["--format=aoti", "--output=/tmp/x.so"], "--output=/tmp/x.so: an aoti"),
    ("maskrcnn.predict", ["--model=/nonexistent.pt2", "--input=/"], "/nonexistent.pt2.json"),
])
def test_bad_input_is_one_line(checkpoint, cache, module, flags, message):
    """If this fails, a bad flag of export or predict --model ends in a traceback or a
    message that does not name the culprit."""
    if module == "maskrcnn.export" and "--checkpoint is required" not in message:
        flags = [f"--checkpoint={checkpoint}", "--output=/tmp/x.pt2", *flags]
    result = run_module(module, *flags, cache_dir=cache)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]

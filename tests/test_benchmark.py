"""The benchmark command: a complete, self-consistent report, on the CPU at a tiny size."""

import json
import math

import pytest
import torch
from torchvision.ops import roi_align

from maskrcnn.bench.measure import time_rounds
from maskrcnn.bench.synthetic import synthetic_batch, torchvision_inputs
from maskrcnn.config import load_config
from maskrcnn.data.gt_masks import mask_targets
from tests.tiny import run_tiny_benchmark

STEPS = 3
SECTIONS = ("command", "environment", "setup", "peak", "memory_kind", "train", "inference",
            "breakdown", "matrix", "unmatched_settings", "ops")




@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny benchmark run with the torchvision baseline: (stdout, the JSON report)."""
    path = tmp_path_factory.mktemp("bench") / "report.json"
    result = run_tiny_benchmark("--baseline=torchvision", f"--steps={STEPS}", "--warmup=1",
                                f"--json_out={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(path.read_text())


def _numbers(tree, path=""):
    """Every (path, number) leaf of a JSON tree."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _numbers(value, f"{path}[{index}]")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield path, tree


def test_report_has_every_section_and_positive_finite_numbers(run):
    """If this fails, a section of the report is missing, or a measurement came out zero,
    negative, NaN or infinite (a timer, FLOP count, memory probe or loss is broken)."""
    _, report = run
    assert set(SECTIONS) <= set(report)
    for section in ("train", "inference"):
        assert {"ours", "torchvision", "ratio"} <= set(report[section])
    numbers = dict(_numbers(report))
    assert len(numbers) > 80
    for path, value in numbers.items():
        assert math.isfinite(value), path
        # The breakdown's "other" is a remainder; every other number is a measured amount.
        if not path.startswith(f".breakdown.stages[{len(report['breakdown']['stages']) - 1}]"):
            assert value > 0, path
    assert len(report["unmatched_settings"]) >= 3
    assert [row["op"] for row in report["ops"]] == [
        "proposals (nms=per_cell)", "proposals (nms=torch)", "proposals (nms=shifted)",
        "ROIAlign forward", "ROIAlign backward", "ROIAlign forward", "ROIAlign backward"]


def test_throughput_times_step_time_is_the_batch(run):
    """If this fails, images/s and step time were computed from different steps or batch
    sizes, or the min/median/max are out of order."""
    _, report = run
    images = report["setup"]["images_per_step"]
    assert images == 2  # TINY's run.images_per_gpu
    for section in ("train", "inference"):
        for side in ("ours", "torchvision"):
            record = report[section][side]
            ips, ms = record["images_per_s"], record["step_ms"]
            assert ips["median"] * ms["median"] / 1e3 == pytest.approx(images, rel=1e-9)
            assert ips["min"] * ms["max"] / 1e3 == pytest.approx(images, rel=1e-9)
            assert ips["min"] <= ips["median"] <= ips["max"]
            assert ms["min"] <= ms["median"] <= ms["max"]
        ratio = report[section]["ours"]["images_per_s"]["median"] / (
            report[section]["torchvision"]["images_per_s"]["median"])
        assert report[section]["ratio"] == pytest.approx(ratio)
    train = report["train"]["ours"]
    mfu = train["flops_per_step"] / (train["step_ms"]["median"] / 1e3) / (
        report["peak"]["tflops"] * 1e12)
    assert train["mfu"] == pytest.approx(mfu)


def test_torchvision_baseline_has_our_architecture(run):
    """If this fails, torchvision's model is not built at settings equivalent to ours: a
    different backbone depth, norm, frozen stages, FPN width or head size would change the
    number of trained parameters or the counted FLOPs."""
    _, report = run
    ours, theirs = report["train"]["ours"], report["train"]["torchvision"]
    assert ours["trainable_parameters"] == theirs["trainable_parameters"]
    # The same convolutions and matrix products; only the data-dependent RoI counts differ.
    assert theirs["flops_per_step"] == pytest.approx(ours["flops_per_step"], rel=0.05)


def test_breakdown_accounts_for_the_step(run):
    """If this fails, a profiler scope in MaskRCNN.forward was renamed or lost (its stage
    reads 0), or the stages no longer add up to the step."""
    _, report = run
    b = report["breakdown"]
    assert b["steps"] == STEPS and b["time"] == "host"
    top = [s for s in b["stages"] if s["part_of"] is None]
    assert sum(s["percent"] for s in top) == pytest.approx(100)
    by_name = {s["name"]: s for s in b["stages"]}
    parts = [s["ms"] for s in b["stages"] if s["part_of"] == "RoI heads"]
    assert sum(parts) == pytest.approx(by_name["RoI heads"]["ms"])
    assert by_name["ROIAlign backward"]["ms"] < by_name["backward"]["ms"]


def test_matrix_time_holds_the_convolutions(run):
    """If this fails, the time in convolutions and matrix products (behind the printed bound
    on our speed-up) misses ops or counts some twice: it must fit in the step, and running
    the counted FLOPs in it must not beat the measured matrix-product peak by far."""
    _, report = run
    peak = report["peak"]["tflops"] * 1e12
    assert report["breakdown"]["matrix_ms"] < report["breakdown"]["step_ms"]
    assert set(report["matrix"]) == {"ours", "torchvision"}
    for side, record in report["matrix"].items():
        assert 0 < record["matrix_ms"] < record["step_ms"], side
        flops = report["train"][side]["flops_per_step"]
        assert flops / (record["matrix_ms"] / 1e3) < 1.5 * peak, side


def test_printed_report_has_the_tables(run):
    """If this fails, the printed report lost a table the JSON has."""
    stdout, _ = run
    for text in ("training step", "inference", "ours / torchvision images/s",
                 "settings that differ", "where our training step's time goes",
                 "ops at training-step sizes", "ROIAlign backward", "MFU: FLOPs as run",
                 "convolutions and matrix products", "would reach"):
        assert text in stdout


def test_bad_baseline_is_a_one_line_error():
    """If this fails, an unknown --baseline value gives a traceback (or is accepted)
    instead of one line naming the flag."""
    result = run_tiny_benchmark("--baseline=detectron2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --baseline=detectron2: must be one of none, torchvision"]


def test_synthetic_masks_are_the_same_in_both_formats():
    """If this fails, our box-local masks and torchvision's full-image masks of the synthetic
    batch describe different shapes, so the two models would train on different targets.
    Compared as each side makes its 28 x 28 mask targets at the ground-truth box itself."""
    batch = synthetic_batch(load_config("shapes", ["run { images_per_gpu: 2 }"]))
    _, targets = torchvision_inputs(batch)
    g = batch.gt_valid.shape[1]
    index = batch.gt_valid.flatten().nonzero()[:, 0]
    ours = mask_targets(batch.gt_masks, batch.gt_boxes, batch.gt_boxes.reshape(-1, 4)[index],
                        index // g, index % g, 28) >= 0.5
    theirs = []
    for target in targets:  # torchvision's project_masks_on_boxes
        rois = torch.cat([torch.arange(len(target["boxes"]))[:, None].float(),
                          target["boxes"]], dim=1)
        theirs.append(roi_align(target["masks"][:, None].float(), rois, (28, 28), 1.0) >= 0.5)
    theirs = torch.cat(theirs)[:, 0]
    iou = (ours & theirs).sum((1, 2)) / (ours | theirs).sum((1, 2))
    assert iou.min() > 0.9, iou


def test_sides_take_turns_step_by_step():
    """If this fails, the two sides' steps are not timed in turn (one side's steps all run
    first, so a drift in the machine's speed favours one side), or a time is lost."""
    calls = []
    seconds = time_rounds([lambda: calls.append("ours"), lambda: calls.append("tv")],
                          torch.device("cpu"), 3)
    assert calls == ["ours", "tv"] * 3
    assert [len(times) for times in seconds] == [3, 3]
    assert all(t >= 0 for times in seconds for t in times)

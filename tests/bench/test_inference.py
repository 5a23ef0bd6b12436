"""maskrcnn-benchmark --inference_formats: our eager model, exported programs and torchvision
timed side by side on the CPU, at a tiny size."""

import json

import pytest

from tests.tiny import run_tiny_benchmark

STEPS = 2
SIDES = ["eager", "pt2", "onnx"]




@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny side-by-side run: (stdout, the JSON report)."""
    path = tmp_path_factory.mktemp("bench") / "report.json"
    result = run_tiny_benchmark(f"--inference_formats={','.join(SIDES)}", f"--steps={STEPS}",
                                "--warmup=1", f"--json_out={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(path.read_text())


def test_every_side_is_timed_against_torchvision(run):
    """If this fails, a side is missing from the report, its images/s and call time come from
    different calls or batch sizes, or its ratio is not to torchvision's images/s."""
    _, report = run
    sides = report["sides"]
    assert list(sides) == [*SIDES, "torchvision"]
    images = report["setup"]["images_per_call"]
    assert images == 2  # TINY's run.images_per_gpu
    baseline = sides["torchvision"]["images_per_s"]["median"]
    for name, record in sides.items():
        ips, ms = record["images_per_s"], record["step_ms"]
        assert ips["median"] * ms["median"] / 1e3 == pytest.approx(images, rel=1e-9), name
        assert 0 < ips["min"] <= ips["median"] <= ips["max"], name
        assert record["ratio"] == pytest.approx(ips["median"] / baseline), name
        assert record["peak_memory_mib"] > 0, name


def test_programs_detect_what_the_eager_model_detects(run):
    """If this fails, the exported programs were traced from other weights than the eager
    side's, or lost detections on the way (the same model on the same batch must keep the
    same number), or a program's export, compile or load time was not reported."""
    _, report = run
    sides = report["sides"]
    eager = sides["eager"]["detections_per_image"]
    assert eager > 0
    for fmt in ("pt2", "onnx"):
        assert sides[fmt]["detections_per_image"] == eager, fmt
        assert set(sides[fmt]["setup_s"]) == {"trace_s", "write_s", "load_s", "first_call_s"}, fmt
        assert all(v > 0 for v in sides[fmt]["setup_s"].values()), fmt


def test_profile_splits_each_call(run):
    """If this fails, the backbone + FPN timing of a side is missing, or does not fit in the
    side's whole call (it timed something else than that side's backbone)."""
    stdout, report = run
    assert set(report["profile"]) == {*SIDES, "torchvision"}
    for name, p in report["profile"].items():
        assert 0 < p["backbone_ms"] < p["call_ms"], name
        assert p["rest_ms"] == pytest.approx(p["call_ms"] - p["backbone_ms"]), name
    for text in ("images/s median", "where a call's time goes", "would reach"):
        assert text in stdout


@pytest.mark.parametrize("flag, message", [
    ("--inference_formats=eager,tflite", "--inference_formats=eager,tflite: must be "
     "distinct names from eager, pt2, aoti, onnx"),
    ("--inference_formats=pt2,pt2", "--inference_formats=pt2,pt2: must be distinct names "
     "from eager, pt2, aoti, onnx"),
])
def test_bad_formats_are_a_one_line_error(flag, message):
    """If this fails, an unknown or repeated side gives a traceback (or is accepted) instead
    of one line naming the flag."""
    result = run_tiny_benchmark(flag)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]

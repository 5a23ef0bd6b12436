"""Installs a built wheel into a fresh virtual environment and uses it from outside the repo.

    .venv/bin/pip wheel --no-deps -w dist . && .venv/bin/python tools/smoke_test.py dist/*.whl

If this fails, the wheel that users install is broken although the tests pass on the source
tree: a file the package needs at run time (a named config, config.proto, a module) is not in
it, it declares a dependency that requirements.lock does not satisfy, or its console scripts
cannot train and evaluate.

1. A fresh venv, .cache/wheel-venv, gets the packages of requirements.lock, hard-linked from
   the copies installed in the running (project) environment, which must hold exactly those
   versions. A real `pip install -r requirements.lock` downloads 5.6 GB again (torch and its
   CUDA wheels; pip kept no download cache on the CI machine) and took 2 minutes there.
   The project's own (editable) install is not linked.
2. `pip install --no-index WHEEL` there: every dependency the wheel declares must be found
   among the lock's packages; then `pip check`.
3. The venv's Python runs this script again with --inside, from a temporary directory, so the
   source tree cannot be imported: maskrcnn comes from the venv's site-packages; its files are
   exactly the source tree's (configs, schema and ops ship); every module imports; the Triton
   NMS kernel runs (interpreted, on CPU tensors); the named
   configs resolve; `maskrcnn-train` trains a tiny model for 2 steps on generated data and
   evaluates it; `maskrcnn-eval` scores the checkpoint with the same AP (0.000 after 2 steps:
   that the command runs); and `maskrcnn-eval` scores the checked-in trained checkpoint
   (tests/assets/shapes-tiny, tests/shapes_checkpoint.py) with the AP training printed for
   it (box 0.307, mask 0.217), which a model built or fed differently would not reach.
"""

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".cache" / "wheel-venv"
# Two steps of 2 images (tests/tiny.py's TINY makes the model and images small).
SHORT = "solver { epochs: 1 images_per_epoch: 4 warmup_steps: 1 lr_decay_epochs: [1] }"
CHECKPOINT = "checkpoints/step_00000002.pt"


def lock_pins() -> dict[str, str]:
    """{distribution name: version} of requirements.lock."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


def link_lock_packages(site: Path) -> int:
    """Hard-links every file of each requirements.lock distribution installed in this
    environment into `site`; returns the number of files. Stops if a version differs."""
    count = 0
    for name, version in lock_pins().items():
        dist = importlib.metadata.distribution(name)
        if dist.version != version:
            sys.exit(f"{name} {dist.version} is installed here, requirements.lock pins {version}")
        root = Path(dist.locate_file("")).resolve()
        for file in dist.files or []:
            source = Path(dist.locate_file(file)).resolve()
            if not source.is_relative_to(root) or not source.is_file():
                continue  # console scripts in bin/, which point at this environment's Python
            target = site / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another file system
                shutil.copy2(source, target)
            count += 1
    return count


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    """Runs a command; on failure prints its output and stops."""
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                            check=False, **kwargs)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(map(str, command))}\n"
                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def outside(wheel: Path) -> None:
    """Steps 1 and 2, then step 3 in the fresh venv."""
    shutil.rmtree(VENV, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(VENV)
    python = VENV / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
                .stdout.strip())
    # The venv comes with setuptools (and pip); the lock's version replaces an unpinned one.
    bundled = {line.split("==")[0].lower() for line in
               run(python, "-m", "pip", "list", "--format=freeze").stdout.split()}
    pinned = [name for name in lock_pins() if name.lower() in bundled]
    if pinned:
        run(python, "-m", "pip", "uninstall", "-q", "-y", *pinned)
    print(f"{VENV}: {link_lock_packages(site)} files of requirements.lock linked", flush=True)
    run(python, "-m", "pip", "install", "-q", "--no-index", wheel)
    run(python, "-m", "pip", "check")
    spec = importlib.util.spec_from_file_location("tiny", REPO / "tests" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([str(python), str(Path(__file__).resolve()), "--inside",
                                 f"--source={REPO / 'maskrcnn'}",
                                 *(f"--set={s}" for s in [*tiny.TINY, SHORT])],
                                cwd=tmp, check=False)
    if result.returncode != 0:
        sys.exit(f"the installed wheel failed its smoke test ({wheel.name})")
    print(f"{wheel.name}: installed in a fresh venv, trained and evaluated from outside the repo")


def check_files(package: Path, source: Path) -> None:
    """The installed package holds exactly the source tree's files (documentation aside), byte
    for byte."""
    def files(root: Path) -> set[Path]:
        return {p.relative_to(root) for p in root.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".md"}

    installed, expected = files(package), files(source)
    assert installed == expected, (f"missing from the wheel: {sorted(expected - installed)}; "
                                   f"only in the wheel: {sorted(installed - expected)}")
    differ = [p for p in expected if (package / p).read_bytes() != (source / p).read_bytes()]
    assert not differ, f"differ from the source tree: {differ}"
    assert (package / "config" / "config.proto").is_file()
    assert {"8x4.pbtxt", "32x4.pbtxt", "shapes.pbtxt"} <= {
        p.name for p in (package / "config" / "named").glob("*.pbtxt")}


def ap(text: str) -> tuple[str, str]:
    found = re.search(r"box AP ([\d.]+), mask AP ([\d.]+)", text)
    assert found, f"no AP printed:\n{text[-3000:]}"
    return found.group(1), found.group(2)


def evaluate_trained_checkpoint(bin_dir: Path, env: dict[str, str]) -> tuple[float, float]:
    """maskrcnn-eval on the checked-in trained checkpoint: its (box AP, mask AP), which must
    be what training printed, above 0.2."""
    spec = importlib.util.spec_from_file_location(
        "shapes_checkpoint", REPO / "tests" / "shapes_checkpoint.py")
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)
    checkpoint = shapes.write_checkpoint(Path("shapes-tiny.pt"))
    evaluation = run(bin_dir / "maskrcnn-eval", f"--checkpoint={checkpoint}",
                     "--output_dir=eval-shapes", "--device=cpu", env=env)
    found = tuple(map(float, ap(evaluation.stdout)))
    trained = shapes.scores()
    assert found == trained and min(found) > 0.2, (evaluation.stdout, trained)
    return found


def inside(source: Path, overrides: list[str]) -> None:
    """Step 3, run by the fresh venv's Python from a temporary directory."""
    # On CPU tensors the kernel runs interpreted; this must precede importing its module.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import maskrcnn
    from maskrcnn.config import load_config, named_configs
    from maskrcnn.ops.nms import batched_nms_fixed

    site = Path(sysconfig.get_path("purelib")).resolve()
    package = Path(maskrcnn.__file__).resolve().parent
    assert package.parent == site, f"maskrcnn imported from {package}, not from {site}"
    assert not Path.cwd().resolve().is_relative_to(REPO)
    check_files(package, source)
    for module in pkgutil.walk_packages(maskrcnn.__path__, "maskrcnn."):
        importlib.import_module(module.name)
    # The Triton NMS kernel ships as source and runs (interpreted, on CPU tensors).
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 0, 30, 9]]])
    index, keep = batched_nms_fixed(boxes, torch.tensor([[0.9, 0.8, 0.7]]),
                                    torch.ones(1, 3, dtype=torch.bool),
                                    torch.zeros(1, 3, dtype=torch.int64), 0.5, 3, "triton")
    assert index[keep].tolist() == [0, 2], (index, keep)

    names = named_configs()
    assert {"shapes", "8x1", "8x4", "16x4", "32x4"} <= set(names), names
    config = load_config("8x4")
    assert config.run.num_gpus * config.run.images_per_gpu == 32
    assert abs(config.solver.base_lr_per_image * 32 - 0.04) < 1e-9
    assert config.model.backbone.depth == 50 and config.model.num_classes == 80
    assert load_config("shapes").data.use_synthetic

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MASKRCNN_CACHE": str(Path("cache").resolve())}
    flags = ["--device=cpu", *(f"--set={s}" for s in overrides)]
    train = run(bin_dir / "maskrcnn-train", "--config=shapes", "--output_dir=run", *flags,
                env=env)
    trained_ap = ap(train.stdout)
    assert Path("run", CHECKPOINT).is_file() and Path("run", "config.pbtxt").is_file()
    evaluation = run(bin_dir / "maskrcnn-eval", f"--checkpoint=run/{CHECKPOINT}",
                     "--output_dir=eval", "--device=cpu", env=env)
    assert ap(evaluation.stdout) == trained_ap, (evaluation.stdout, trained_ap)
    assert re.search(r"^segm( +-?\d\.\d{3}){12}$", evaluation.stdout, re.M)
    assert Path("eval", "coco_results.json").is_file()
    box, mask = evaluate_trained_checkpoint(bin_dir, env)
    print(f"installed maskrcnn at {package}: box AP {trained_ap[0]}, mask AP {trained_ap[1]} "
          f"after 2 tiny steps (train and eval agree); box AP {box:.3f}, mask AP {mask:.3f} "
          "on the checked-in trained checkpoint (as training printed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", nargs="?", type=Path)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args.source, args.set)
    elif args.wheel is None or not args.wheel.is_file():
        parser.error("give the path of a built wheel")
    else:
        outside(args.wheel.resolve())


if __name__ == "__main__":
    main()

"""The deployment files (Dockerfile, Kubernetes manifest, SLURM script) and the launch commands
and configs table of the README and docs/ agree with the package, its configs and requirements.lock.

None of this can run here (no Docker daemon, no cluster, one CPU node), so these tests read the
files and check what can go stale: versions, names, counts and the torchrun command lines.
"""

import math
import re
import shlex
import subprocess
import tomllib
from importlib.metadata import requires
from pathlib import Path

import pytest
import yaml
from absl import flags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from torch.distributed.run import get_args_parser

import maskrcnn.train  # noqa: F401  (defines the training command's flags)
from maskrcnn.config import load_config, named_configs

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
SLURM = REPO / "deploy" / "slurm" / "maskrcnn-32x4.sbatch"
README = REPO / "README.md"
# The user documents whose launch commands and tables these tests check.
DISTRIBUTED = REPO / "docs" / "distributed.md"
CONFIGS = REPO / "docs" / "configs.md"
# What the image takes from the PyTorch base image instead of requirements.lock (Dockerfile).
BASE_IMAGE = re.compile(r"torch|torchvision|triton|nvidia-.*|cuda-.*")
# requirements.lock's development tools, which the image leaves out.
DEV_TOOLS = {"pytest", "ruff", "grpcio-tools", "pyyaml"}
COCO_TRAIN_IMAGES = 117266  # train2017 images with annotations


def lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def docker_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def dockerfile_pins() -> dict[str, str]:
    """{name: version} of every `name==version` on a pip command line of the Dockerfile."""
    pins = {}
    for instruction, args in docker_instructions():
        if instruction == "RUN" and "pip" in args:
            for token in shlex.split(args):
                if re.fullmatch(r"[A-Za-z0-9._-]+==\S+", token):
                    name, version = token.split("==")
                    pins[canonicalize_name(name)] = version
    return pins


def torchrun_argv(command: str) -> list[str]:
    """torchrun's arguments in a shell command line (continuations joined, comments dropped)."""
    words = shlex.split(command.replace("\\\n", " "), comments=True)
    return words[words.index("torchrun") + 1:]


def node_count(nnodes: str) -> int:
    """torchrun's --nnodes, "N" or "MIN:MAX"; a recipe needs a fixed count."""
    low, _, high = nnodes.partition(":")
    assert high in ("", low), f"--nnodes={nnodes}: an elastic range changes the global batch"
    return int(low)


def check_launch(argv: list[str], nnodes: int | None = None) -> str:
    """Parses torchrun's arguments as torchrun does. The script must be `-m maskrcnn.train`
    with a named config and defined flags; with a numeric process count, the processes times
    run.images_per_gpu must be the named config's global batch (its LR). Returns the config."""
    args = get_args_parser().parse_args(argv)
    assert args.module and args.training_script == "maskrcnn.train", argv
    values = {}
    overrides = []
    for arg in args.training_script_args:
        name, _, value = arg.removeprefix("--").partition("=")
        assert arg.startswith("--") and name in flags.FLAGS, f"not a training flag: {arg}"
        if name == "set":
            overrides.append(value)
        values[name] = value
    name = values.get("config")
    assert name in named_configs(), f"--config={name} is not a named config"
    if args.nproc_per_node.isdigit():
        nodes = nnodes if nnodes is not None else node_count(args.nnodes)
        recipe = load_config(name).run
        launched = load_config(name, overrides).run
        assert (nodes * int(args.nproc_per_node) * launched.images_per_gpu
                == recipe.num_gpus * recipe.images_per_gpu), argv
    return name


def test_dockerfile_pins_match_the_lock():
    """If this fails, the image installs other versions than the ones CI tested."""
    pins, locked = dockerfile_pins(), lock()
    assert pins, "no pinned pip installs found in the Dockerfile"
    for name, version in pins.items():
        assert locked.get(name) == version, f"Dockerfile {name}=={version}, lock {locked.get(name)}"
        assert not BASE_IMAGE.fullmatch(name), f"{name} comes with the base image"
        assert name not in DEV_TOOLS, f"{name} is a development tool"


def test_dockerfile_installs_every_runtime_dependency():
    """If this fails, a dependency of the package (or of a pinned package) is in neither the
    Dockerfile's pins nor the base image, and the image build stops at `pip install
    --no-index`."""
    pins = dockerfile_pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = [Requirement(r) for r in project["dependencies"]]
    for name in pins:
        needed += [Requirement(r) for r in requires(name) or []]
    for requirement in needed:
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins or BASE_IMAGE.fullmatch(name), f"{name} is not installed in the image"


def test_dockerfile_base_image_is_pinned():
    """If this fails, the image is built on whatever the registry serves today."""
    instructions = docker_instructions()
    arg = next(a for i, a in instructions if i == "ARG" and a.startswith("PYTORCH_IMAGE="))
    assert re.fullmatch(r"PYTORCH_IMAGE=pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+", arg)
    bases = [a.split()[0] for i, a in instructions if i == "FROM"]
    assert set(bases) == {"${PYTORCH_IMAGE}-devel", "scratch", "${PYTORCH_IMAGE}-runtime"}
    assert bases[-1] == "${PYTORCH_IMAGE}-runtime"


def test_dockerfile_copies_what_the_wheel_build_reads():
    """If this fails, the image build cannot find a file: it is not in the repo, or
    .dockerignore keeps it out of the build context."""
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().split()
               if line.startswith("!")}
    sources = [s for i, a in docker_instructions() if i == "COPY" and "--from" not in a
               for s in a.split()[:-1]]
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    assert {"pyproject.toml", readme, "maskrcnn"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists() and source in allowed, source


def test_dockerfile_launches_training_with_torchrun():
    """If this fails, `docker run IMAGE` does not start the training job."""
    instructions = dict(docker_instructions())
    assert yaml.safe_load(instructions["ENTRYPOINT"]) == ["torchrun"]
    check_launch(yaml.safe_load(instructions["CMD"]))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest(path):
    """If this fails, the manifest does not parse, or its parts disagree: the rendezvous
    endpoint names no pod, the pods are not in the Service's DNS, or the node and GPU counts do
    not make the config's global batch."""
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert all({"apiVersion", "kind", "metadata"} <= d.keys() for d in documents)
    kinds = {d["kind"]: d for d in documents}
    service, job = kinds["Service"], kinds["Job"]
    name = job["metadata"]["name"]
    pod = job["spec"]["template"]["spec"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": name}
    assert pod["subdomain"] == service["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed"
    (container,) = pod["containers"]
    argv = torchrun_argv(" ".join([*container["command"], *container["args"]]))
    args = get_args_parser().parse_args(argv)
    nodes = node_count(args.nnodes)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    assert args.rdzv_endpoint == f"{name}-0.{pod['subdomain']}:29500"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == int(args.nproc_per_node)
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    assert check_launch(argv) in name


def test_slurm_script():
    """If this fails, the SLURM example has a shell syntax error, its #SBATCH resources do not
    match its torchrun command, or docs/distributed.md shows another version of it."""
    text = SLURM.read_text()
    subprocess.run(["bash", "-n", str(SLURM)], check=True)
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    argv = torchrun_argv(text[text.index("srun torchrun"):])
    assert get_args_parser().parse_args(argv).nproc_per_node == sbatch["gpus-per-node"]
    assert sbatch["ntasks-per-node"] == "1"  # one torchrun agent per node
    check_launch(argv, nnodes=int(sbatch["nodes"]))
    assert f"```bash\n{text}```" in DISTRIBUTED.read_text()


def readme_torchrun_commands() -> list[str]:
    """The torchrun command lines of the README and docs/distributed.md."""
    text = README.read_text() + DISTRIBUTED.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    # `srun torchrun` is the SLURM script's, checked with its #SBATCH lines above.
    return [line for line in lines if line.startswith("torchrun ")]


@pytest.mark.parametrize("command", readme_torchrun_commands())
def test_readme_launch_commands(command):
    """If this fails, a launch command in the docs does not parse as torchrun's, names no
    config or flag we have, or trains another global batch than its config's."""
    check_launch(torchrun_argv(command))


def readme_configs_table() -> list[dict[str, str]]:
    lines = CONFIGS.read_text().split("## Named configs", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| name |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    header, _, *body = rows
    return [dict(zip(header, row, strict=True)) for row in body]


def test_readme_configs_table_matches_the_configs():
    """If this fails, docs/configs.md's table of named configs states another batch, LR, schedule
    or clipping than the config files."""
    table = {row["name"].strip("`"): row for row in readme_configs_table()}
    assert set(table) == set(named_configs())
    for name, row in table.items():
        config = load_config(name)
        run, solver = config.run, config.solver
        batch = run.num_gpus * run.images_per_gpu
        decays = ", ".join(str(e) for e in solver.lr_decay_epochs)
        assert row["GPUs x images"] == f"{run.num_gpus} x {run.images_per_gpu}", name
        assert row["global batch"] == str(batch), name
        lr = float(row["LR (per image x batch)"].split()[0])
        assert math.isclose(lr, solver.base_lr_per_image * batch, rel_tol=1e-6), name
        assert f"({solver.base_lr_per_image:g} x {batch})" in row["LR (per image x batch)"]
        assert row["epochs (LR x0.1 at)"] == f"{solver.epochs} ({decays})", name
        assert row["clip"] == (f"{solver.grad_clip_norm:g}" if solver.grad_clip_norm else "")
        if not config.data.use_synthetic:
            images = solver.images_per_epoch or COCO_TRAIN_IMAGES
            steps = solver.epochs * (images // batch)
            decay_steps = ", ".join(str(math.ceil(e * images / batch))
                                    for e in solver.lr_decay_epochs)
            assert row["steps (LR x0.1 at)"] == f"{steps} ({decay_steps})", name

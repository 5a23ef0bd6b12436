"""deploy/sagemaker: the launcher's CreateTrainingJob request and the torchrun command its entry
script builds on each instance, without AWS (a stub session records what would be sent).

The command is checked as the other launch files' are (tests/test_deploy.py): it parses with
torchrun's own parser, runs `-m maskrcnn.train` with defined flags, and its processes make
the named config's global batch.
"""

import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from maskrcnn.engine import checkpoint as ckpt
from tests.test_deploy import DISTRIBUTED, check_launch, torchrun_argv
from tests.tiny import TINY

REPO = Path(__file__).resolve().parents[1]
SAGEMAKER = REPO / "deploy" / "sagemaker"
REQUIRED = ["--image=123456789012.dkr.ecr.us-east-1.amazonaws.com/maskrcnn:0.1.0",
            "--role=arn:aws:iam::123456789012:role/SageMakerTraining", "--bucket=my-bucket"]
HOSTS = ["algo-1", "algo-2", "algo-3", "algo-4"]  # SageMaker's names for 4 instances


def load(name: str):
    """deploy/sagemaker/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"sagemaker_{name}", SAGEMAKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch, entry = load("launch"), load("entry")


def request(*argv: str) -> dict:
    return launch.build_request(launch.parser().parse_args([*REQUIRED, *argv]))


def channels(request: dict) -> dict[str, dict]:
    return {c["ChannelName"]: c for c in request["InputDataConfig"]}


def s3_uri(channel: dict) -> str:
    return channel["DataSource"]["S3DataSource"]["S3Uri"]


def command_on(request: dict, host: str) -> list[str]:
    """torchrun's arguments as entry.py builds them on `host` (algo-K) of the job."""
    hosts = [f"algo-{k}" for k in range(1, request["ResourceConfig"]["InstanceCount"] + 1)]
    resource_config = {"current_host": host, "hosts": hosts, "network_interface_name": "eth0"}
    (nproc,) = request["AlgorithmSpecification"]["ContainerArguments"]
    command = entry.torchrun_command(resource_config, request["HyperParameters"],
                                     int(nproc.removeprefix("--nproc_per_node=")))
    return torchrun_argv(shlex.join(command))


def training_flags(argv: list[str]) -> dict[str, list[str]]:
    flags = {}
    for arg in get_args_parser().parse_args(argv).training_script_args:
        name, _, value = arg.removeprefix("--").partition("=")
        flags.setdefault(name, []).append(value)
    return flags


def test_default_request_trains_32x4_on_4_p4d():
    """If this fails, the default job is not 32x4 on 4 ml.p4d.24xlarge running the image
    through entry.py, or its channels, hyperparameters and checkpoint folder disagree with
    the paths maskrcnn-train is given (data, weights, output in the synced folder, --resume)."""
    job = request()
    spec = job["AlgorithmSpecification"]
    assert spec["TrainingImage"] == REQUIRED[0].split("=", 1)[1]
    assert spec["ContainerEntrypoint"] == ["python", "/opt/ml/input/data/code/entry.py"]
    assert spec["ContainerArguments"] == ["--nproc_per_node=8"]
    assert job["ResourceConfig"]["InstanceType"] == "ml.p4d.24xlarge"
    assert job["ResourceConfig"]["InstanceCount"] == 4
    assert job["RoleArn"] == REQUIRED[1].split("=", 1)[1]
    inputs = channels(job)
    assert set(inputs) == {"coco", "weights", "code"}
    assert s3_uri(inputs["coco"]) == "s3://my-bucket/coco/"
    assert s3_uri(inputs["weights"]) == "s3://my-bucket/weights/resnet50-0676ba61.pth"
    assert s3_uri(inputs["code"]) == f"s3://my-bucket/maskrcnn/code/{launch.entry_digest()}/"
    assert job["HyperParameters"] == {
        "config": "32x4", "device": "cuda", "data_dir": "/opt/ml/input/data/coco",
        "backbone_weights": "/opt/ml/input/data/weights/resnet50-0676ba61.pth",
        "output_dir": "/opt/ml/checkpoints", "resume": "true"}
    assert job["CheckpointConfig"] == {
        "S3Uri": f"s3://my-bucket/maskrcnn/runs/{job['TrainingJobName']}",
        "LocalPath": job["HyperParameters"]["output_dir"]}
    assert re.fullmatch(r"maskrcnn-32x4-\d{8}-\d{6}", job["TrainingJobName"])
    assert job["EnableManagedSpotTraining"] is False
    assert "MaxWaitTimeInSeconds" not in job["StoppingCondition"]


def test_entry_command_on_host_2_of_4_parses_as_torchrun():
    """If this fails, the command entry.py runs on the second of 4 instances is not one
    torchrun agent of a 4-node static rendezvous on the first host, or its training flags
    do not exist, or its processes do not make 32x4's global batch of 128."""
    job = request()
    argv = command_on(job, "algo-2")
    assert check_launch(argv) == "32x4"
    args = get_args_parser().parse_args(argv)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("4", "8", 1)
    assert (args.rdzv_backend, args.master_addr, args.master_port) == ("static", "algo-1", 29500)
    flags = training_flags(argv)
    coco, weights = channels(job)["coco"], channels(job)["weights"]
    assert flags["data_dir"] == [f"/opt/ml/input/data/{coco['ChannelName']}"]
    assert flags["backbone_weights"] == [
        f"/opt/ml/input/data/{weights['ChannelName']}/{s3_uri(weights).rsplit('/', 1)[1]}"]
    assert flags["output_dir"] == [job["CheckpointConfig"]["LocalPath"]]
    assert flags["resume"] == ["true"] and flags["device"] == ["cuda"]
    assert get_args_parser().parse_args(command_on(job, "algo-1")).node_rank == 0
    assert get_args_parser().parse_args(command_on(job, "algo-4")).node_rank == 3


def test_repeated_set_keeps_its_order_and_the_batch():
    """If this fails, several --set overrides do not reach maskrcnn-train in order (the
    later one must win), or 8 instances x 8 GPUs x 2 images are not accepted as 32x4's
    batch of 128."""
    job = request("--instance_count=8", "--set=run { images_per_gpu: 3 }",
                  "--set=run { images_per_gpu: 2 }", "--set=run { log_period_steps: 50 }")
    assert job["HyperParameters"]["set.2"] == "run { images_per_gpu: 2 }"
    # SageMaker's hyperparameters.json need not keep the keys' order.
    job["HyperParameters"] = dict(reversed(job["HyperParameters"].items()))
    argv = command_on(job, "algo-1")
    assert training_flags(argv)["set"] == ["run { images_per_gpu: 3 }",
                                           "run { images_per_gpu: 2 }",
                                           "run { log_period_steps: 50 }"]
    check_launch(argv)


@pytest.mark.parametrize("argv, culprit", [
    (["--instance_count=2"], "--instance_count=2"),
    (["--instance_type=ml.x9.mega"], "--instance_type=ml.x9.mega"),
    (["--config=31x4"], "--config=31x4"),
    (["--set=run { images_per_gpu: 2 }"], "--instance_count=4"),
    (["--set=run { nonsense: 1 }"], "nonsense"),
    (["--spot", "--max_wait_hours=1"], "--max_wait_hours=1"),
    (["--weights=s3://my-bucket/weights/"], "--weights"),
    (["--data=/data/coco"], "--data=/data/coco"),
    (["--job_name=my_job"], "--job_name=my_job"),
])
def test_bad_arguments_stop_with_one_line(argv, culprit, capsys):
    """If this fails, a job that cannot train its config (wrong instance count or type, a
    batch changed by --set, an unknown config) or a malformed argument is submitted anyway,
    or the error is a traceback instead of one line naming the argument."""
    with pytest.raises(SystemExit) as stopped:
        launch.main([*REQUIRED, *argv, "--dry_run"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("launch.py: error: ") and culprit in error, error


def test_spot_sets_a_wait_limit():
    """If this fails, --spot does not ask for managed spot training, or its wait limit is
    below the run limit (which CreateTrainingJob rejects)."""
    job = request("--spot", "--max_run_hours=5")
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 5 * 3600,
                                        "MaxWaitTimeInSeconds": 10 * 3600}


class StubClient:
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def put_object(self, **kwargs):
        self.calls.append((self.name, "put_object", kwargs))

    def create_training_job(self, **kwargs):
        self.calls.append((self.name, "create_training_job", kwargs))
        return {"TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/"
                                  f"{kwargs['TrainingJobName']}"}


class StubSession:
    def __init__(self):
        self.calls = []

    def client(self, name: str):
        return StubClient(name, self.calls)


def test_submit_uploads_entry_then_creates_the_printed_request(capsys):
    """If this fails, submitting sends another request than --dry_run prints, or entry.py is
    not uploaded where the code channel (and so ContainerEntrypoint) looks for it."""
    argv = [*REQUIRED, "--job_name=maskrcnn-test", "--spot"]
    launch.main([*argv, "--dry_run"])
    printed = json.loads(capsys.readouterr().out)
    session = StubSession()
    launch.main(argv, session=session)
    assert "training-job/maskrcnn-test" in capsys.readouterr().out
    (s3, upload, put), (sagemaker, create, sent) = session.calls
    assert (s3, upload, sagemaker, create) == ("s3", "put_object", "sagemaker",
                                               "create_training_job")
    assert sent == printed
    code = s3_uri(channels(sent)["code"])
    assert f"s3://{put['Bucket']}/{put['Key']}" == code + "entry.py"
    assert put["Body"] == (SAGEMAKER / "entry.py").read_bytes()
    assert sent["AlgorithmSpecification"]["ContainerEntrypoint"][-1].endswith(
        "/code/entry.py")


def test_submit_error_is_one_line(capsys):
    """If this fails, an AWS error (no credentials, access denied) ends in a traceback."""
    error = type("NoCredentialsError", (Exception,), {"__module__": "botocore.exceptions"})

    class Failing(StubSession):
        def client(self, name):
            raise error("Unable to locate credentials")

    with pytest.raises(SystemExit) as stopped:
        launch.main(REQUIRED, session=Failing())
    assert stopped.value.code == "launch.py: NoCredentialsError: Unable to locate credentials"


def test_entry_execs_torchrun_with_the_interface(tmp_path):
    """If this fails, entry.py as SageMaker starts it (files in its config folder) does not
    replace itself with torchrun and the command built above, or NCCL is not told the
    network interface SageMaker names."""
    job = request()
    (tmp_path / "hyperparameters.json").write_text(json.dumps(job["HyperParameters"]))
    (tmp_path / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "algo-3", "hosts": HOSTS, "network_interface_name": "eth7"}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "torchrun"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps([sys.argv[1:], os.environ['NCCL_SOCKET_IFNAME']]))\n")
    fake.chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if k != "NCCL_SOCKET_IFNAME"}
    environment["PATH"] = f"{bin_dir}{os.pathsep}{environment['PATH']}"
    spec = job["AlgorithmSpecification"]
    done = subprocess.run([sys.executable, str(SAGEMAKER / "entry.py"),
                           *spec["ContainerArguments"], f"--config_dir={tmp_path}"],
                          capture_output=True, text=True, env=environment, check=True)
    announced, ran = done.stdout.splitlines()
    argv, interface = json.loads(ran)
    assert argv == command_on(job, "algo-3") and interface == "eth7"
    assert announced == f"algo-3: NCCL_SOCKET_IFNAME=eth7 torchrun {shlex.join(argv)}"


def test_two_instances_train_together_from_scratch_with_resume(tmp_path, cache):
    """If this fails, two entry.py agents started as on two instances (here both on this
    machine, on the CPU) do not join one job of 2 processes through the first host's
    rendezvous, or --resume=true, which every SageMaker job passes, stops a first start that
    has no checkpoint yet instead of training from scratch and writing one."""
    out = tmp_path / "opt-ml-checkpoints"
    hyperparameters = {"config": "shapes", "device": "cpu", "output_dir": str(out),
                       "resume": "true", **{f"set.{k}": text for k, text in
                                            enumerate(TINY, start=1)}}
    hosts = ["localhost", "127.0.0.1"]  # two names of this machine; the first hosts the store
    with socket.socket() as free:
        free.bind(("localhost", 0))
        port = free.getsockname()[1]
    environment = {**os.environ, "MASKRCNN_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": "",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    agents = []
    for host in hosts:
        config_dir = tmp_path / host
        config_dir.mkdir()
        (config_dir / "hyperparameters.json").write_text(json.dumps(hyperparameters))
        (config_dir / "resourceconfig.json").write_text(
            json.dumps({"current_host": host, "hosts": hosts}))
        agents.append(subprocess.Popen(
            [sys.executable, str(SAGEMAKER / "entry.py"), "--nproc_per_node=1",
             f"--master_port={port}", f"--config_dir={config_dir}"],
            cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    try:
        logs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()  # only if still running (a rendezvous that never formed)
    assert [agent.returncode for agent in agents] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    first = logs[0]
    assert f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch" in first
    assert "on cpu in each of 2 processes" in first
    assert ckpt.latest_checkpoint(out) is not None


@pytest.mark.parametrize("resource_config, hyperparameters, culprit", [
    ({"current_host": "algo-5", "hosts": HOSTS}, {"config": "32x4"}, "'algo-5'"),
    ({"current_host": "algo-1", "hosts": HOSTS}, {"set.0": "x"}, "'set.0'"),
    ({"current_host": "algo-1", "hosts": HOSTS}, {"--config": "32x4"}, "'--config'"),
])
def test_entry_errors_are_one_line(resource_config, hyperparameters, culprit):
    """If this fails, a resourceconfig.json without this host, or a hyperparameter that
    cannot be a flag, is not stopped with one line naming it."""
    with pytest.raises(SystemExit) as stopped:
        entry.torchrun_command(resource_config, hyperparameters, 8)
    assert culprit in stopped.value.code and "\n" not in stopped.value.code


def test_metric_regexes_match_the_log_lines():
    """If this fails, a metric of the job (loss, speed, AP) matches nothing in lines of the
    form maskrcnn-train prints (engine/hooks.py LogLines, train.py's last line)."""
    step = ("step 500/10992 epoch 0.55 rpn_cls 0.0401 rpn_box 0.0522 cls 0.3188 box 0.2874 "
            "mask 0.3470 total 1.0455 lr 0.16 1234.56 img/s data-wait 1% peak-mem 9876 MiB "
            "eta 12m34s")
    final = "box AP 0.372, mask AP 0.341 on /opt/ml/input/data/coco/annotations/x.json"
    found = {m["Name"]: re.search(m["Regex"], step) or re.search(m["Regex"], final)
             for m in launch.METRICS}
    assert {name: match and match[1] for name, match in found.items()} == {
        "train:loss": "1.0455", "train:images_per_s": "1234.56", "val:box_AP": "0.372",
        "val:mask_AP": "0.341"}


def test_docs_launch_commands_build():
    """If this fails, a launch.py command in docs/distributed.md names an argument the
    launcher does not have or builds a job that cannot train its config."""
    blocks = re.findall(r"```bash\n(.*?)```", DISTRIBUTED.read_text(), re.S)
    commands = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()
                if line.startswith("python deploy/sagemaker/launch.py")]
    assert commands, "docs/distributed.md shows no launch.py command"
    for command in commands:
        words = shlex.split(command)[2:]
        job = launch.build_request(launch.parser().parse_args(words))
        check_launch(command_on(job, "algo-1"))

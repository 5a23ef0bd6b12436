"""Submits a SageMaker training job that trains a named config with the repo's Docker image.

    python deploy/sagemaker/launch.py --image=ECR_IMAGE_URI --role=ROLE_ARN --bucket=BUCKET \
        [--config=32x4] [--instance_type=ml.p4d.24xlarge] [--instance_count=4] [--spot] \
        [--set=TEXT ...] [--dry_run]

The request is CreateTrainingJob's, built as a plain dict: nothing is needed to build it or to
print it (--dry_run), and boto3 is imported only to submit it. The SageMaker Python SDK's
PyTorch estimator would build the same request but weighs far more: installed with its
dependencies, sagemaker 3.27.0 is 132 distributions (981 MiB), 2.257.7 (the last 2.x) 62
(282 MiB), boto3 1.44.18 seven (37 MiB).

The job, on every instance:
- the image (the Dockerfile's, pushed to ECR) starts deploy/sagemaker/entry.py, which arrives
  in the `code` channel (uploaded to S3 by this script, under its content's hash) and runs
  one torchrun agent per instance: --nnodes = instances, --nproc_per_node = GPUs per
  instance, the first instance hosts the rendezvous;
- COCO (annotations/, train2017/, val2017/ under --data) is the `coco` channel, read as
  --data_dir; the backbone's ImageNet file (--weights) is the `weights` channel, read as
  --backbone_weights;
- --output_dir is /opt/ml/checkpoints, which SageMaker keeps in sync with
  s3://BUCKET/PREFIX/runs/RUN_NAME and copies back onto the instances when a job starts, so
  --resume (always passed; it starts from scratch when there is no checkpoint) continues a
  job after a spot interruption, or a new job launched with the same --run_name.

The config's global batch is fixed by its name (NxM: N GPUs x M images); the instances times
their GPUs times run.images_per_gpu (after --set) must make it, as for every other launcher.
"""

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path, PurePosixPath

from maskrcnn.config import ConfigError, load_config, named_configs

ENTRY = Path(__file__).resolve().with_name("entry.py")
# Where SageMaker puts channels, and the folder it syncs with CheckpointConfig's S3 uri.
CHANNELS = PurePosixPath("/opt/ml/input/data")
CHECKPOINTS = "/opt/ml/checkpoints"
WEIGHTS = "s3://{bucket}/weights/resnet50-0676ba61.pth"  # torchvision's ResNet-50 file
# GPUs per instance. ml.p3 (V100) is left out: the image's CUDA 13 build of torch has no
# kernels for Volta. Others: --gpus_per_instance.
GPUS = {
    **dict.fromkeys(["ml.p4d.24xlarge", "ml.p4de.24xlarge", "ml.p5.48xlarge", "ml.p5e.48xlarge",
                     "ml.p5en.48xlarge", "ml.g5.48xlarge", "ml.g6.48xlarge", "ml.g6e.48xlarge"],
                    8),
    **dict.fromkeys(["ml.g5.12xlarge", "ml.g5.24xlarge", "ml.g6.12xlarge", "ml.g6.24xlarge",
                     "ml.g6e.12xlarge", "ml.g6e.24xlarge"], 4),
    **dict.fromkeys(["ml.p5.4xlarge", "ml.g5.2xlarge", "ml.g6.2xlarge", "ml.g6e.2xlarge"], 1),
}
# Log lines of maskrcnn-train (engine/hooks.py LogLines, train.py's last line) as CloudWatch
# metrics of the job.
METRICS = [
    {"Name": "train:loss", "Regex": r" total ([0-9.]+) lr "},
    {"Name": "train:images_per_s", "Regex": r" ([0-9.]+) img/s "},
    {"Name": "val:box_AP", "Regex": r"box AP ([0-9.]+), mask AP"},
    {"Name": "val:mask_AP", "Regex": r"mask AP ([0-9.]+)"},
]
JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")  # CreateTrainingJob's rule


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True, help="The training image's URI in ECR (the "
                   "repo's Dockerfile, built and pushed).")
    p.add_argument("--role", required=True, help="ARN of the IAM role the job runs as (reads "
                   "the bucket, writes checkpoints and output).")
    p.add_argument("--bucket", required=True, help="S3 bucket for the code, checkpoints and "
                   "output; also the default place of --data and --weights.")
    p.add_argument("--prefix", default="maskrcnn", help="Key prefix of what the job writes.")
    p.add_argument("--config", default="32x4", help="A named config.")
    p.add_argument("--set", action="append", default=[], help="A --set override for "
                   "maskrcnn-train (text format); repeatable.")
    p.add_argument("--instance_type", default="ml.p4d.24xlarge")
    p.add_argument("--instance_count", type=int, default=4)
    p.add_argument("--gpus_per_instance", type=int,
                   help="GPUs of --instance_type, for a type not in this script's table.")
    p.add_argument("--data", help="S3 folder of COCO 2017 (annotations/, train2017/, "
                   "val2017/); default s3://BUCKET/coco/.")
    p.add_argument("--weights", help="S3 uri of torchvision's ResNet ImageNet file; default "
                   + WEIGHTS.replace("{bucket}", "BUCKET") + ".")
    p.add_argument("--input_mode", choices=["File", "FastFile"], default="File",
                   help="File copies COCO onto each instance before training (about 20 GB); "
                        "FastFile streams it from S3 as it is read.")
    p.add_argument("--volume_gb", type=int, default=200, help="Storage per instance for the "
                   "data and checkpoints.")
    p.add_argument("--job_name", help="Default maskrcnn-CONFIG-YYYYMMDD-HHMMSS (UTC).")
    p.add_argument("--run_name", help="The checkpoint folder s3://BUCKET/PREFIX/runs/RUN_NAME; "
                   "default the job name. Name an earlier job's run to continue it.")
    p.add_argument("--spot", action="store_true", help="Managed spot training: interrupted "
                   "instances come back and the job resumes from its last checkpoint.")
    p.add_argument("--max_run_hours", type=float, default=24.0,
                   help="Training time limit (spot: time on instances).")
    p.add_argument("--max_wait_hours", type=float,
                   help="With --spot: limit including waits for spot capacity; default twice "
                        "--max_run_hours.")
    p.add_argument("--region", help="AWS region to submit in (default: boto3's).")
    p.add_argument("--dry_run", action="store_true",
                   help="Print the CreateTrainingJob request as JSON; submit nothing.")
    return p


def entry_digest() -> str:
    """The first 16 hex digits of entry.py's SHA-256: its folder in S3, so a new version
    never replaces the one a running job reads."""
    return hashlib.sha256(ENTRY.read_bytes()).hexdigest()[:16]


def channel(name: str, s3_uri: str, input_mode: str = "File") -> dict:
    """An S3 input channel, copied whole to every instance at /opt/ml/input/data/<name>."""
    return {"ChannelName": name, "InputMode": input_mode,
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": s3_uri,
                                            "S3DataDistributionType": "FullyReplicated"}}}


def gpus_per_instance(args: argparse.Namespace) -> int:
    gpus = args.gpus_per_instance or GPUS.get(args.instance_type)
    if gpus is None:
        raise ConfigError(f"--instance_type={args.instance_type}: GPU count not known; pass "
                          "--gpus_per_instance")
    return gpus


def check_batch(args: argparse.Namespace, gpus: int) -> None:
    """The instances' processes with run.images_per_gpu (after --set) must train the named
    config's global batch, on which its LR and schedule are built."""
    if args.config not in named_configs():
        raise ConfigError(f"--config={args.config}: not a named config (one of "
                          f"{', '.join(named_configs())})")
    recipe = load_config(args.config).run
    per_gpu = load_config(args.config, args.set).run.images_per_gpu
    batch = args.instance_count * gpus * per_gpu
    if batch != recipe.num_gpus * recipe.images_per_gpu:
        raise ConfigError(
            f"--instance_count={args.instance_count} x {gpus} GPUs x {per_gpu} images = a "
            f"global batch of {batch}, but {args.config} trains {recipe.num_gpus} x "
            f"{recipe.images_per_gpu}: change --instance_count or the config")


def hyperparameters(args: argparse.Namespace, weights: str) -> dict[str, str]:
    """maskrcnn-train's flags, as entry.py turns them back into a command line (name.K: the
    K-th of a repeated flag)."""
    flags = {"config": args.config, "device": "cuda",  # fail, not fall back to the CPU
             "data_dir": str(CHANNELS / "coco"),
             "backbone_weights": str(CHANNELS / "weights" / PurePosixPath(weights).name),
             "output_dir": CHECKPOINTS, "resume": "true"}
    flags.update({f"set.{k}": text for k, text in enumerate(args.set, start=1)})
    return flags


def build_request(args: argparse.Namespace, now: float | None = None) -> dict:
    """The CreateTrainingJob request for the parsed arguments (ConfigError on bad ones)."""
    gpus = gpus_per_instance(args)
    check_batch(args, gpus)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    job = args.job_name or f"maskrcnn-{args.config.replace('_', '-')}-{stamp}"
    if not JOB_NAME.fullmatch(job):
        raise ConfigError(f"--job_name={job}: at most 63 letters, digits and hyphens, "
                          "starting and ending with a letter or digit")
    data = args.data or f"s3://{args.bucket}/coco/"
    weights = args.weights or WEIGHTS.format(bucket=args.bucket)
    for flag, uri in (("--data", data), ("--weights", weights)):
        if not uri.startswith("s3://"):
            raise ConfigError(f"{flag}={uri}: must be an s3:// uri")
    if weights.endswith("/"):
        raise ConfigError(f"--weights={weights}: must name the .pth file, not a folder")
    base = f"s3://{args.bucket}/{args.prefix}"
    stopping = {"MaxRuntimeInSeconds": round(args.max_run_hours * 3600)}
    if args.spot:
        wait_hours = args.max_wait_hours or 2 * args.max_run_hours
        if wait_hours < args.max_run_hours:
            raise ConfigError(f"--max_wait_hours={wait_hours:g}: must be at least "
                              f"--max_run_hours={args.max_run_hours:g}")
        stopping["MaxWaitTimeInSeconds"] = round(wait_hours * 3600)
    elif args.max_wait_hours:
        raise ConfigError("--max_wait_hours: only with --spot")
    return {
        "TrainingJobName": job,
        "RoleArn": args.role,
        "AlgorithmSpecification": {
            "TrainingImage": args.image,
            "TrainingInputMode": args.input_mode,
            # Replaces the image's torchrun entry point; entry.py execs torchrun.
            "ContainerEntrypoint": ["python", str(CHANNELS / "code" / ENTRY.name)],
            "ContainerArguments": [f"--nproc_per_node={gpus}"],
            "MetricDefinitions": METRICS,
        },
        "HyperParameters": hyperparameters(args, weights),
        "InputDataConfig": [
            channel("coco", data, args.input_mode),
            channel("weights", weights),
            channel("code", f"{base}/code/{entry_digest()}/"),
        ],
        "OutputDataConfig": {"S3OutputPath": f"{base}/output"},
        "ResourceConfig": {"InstanceType": args.instance_type,
                           "InstanceCount": args.instance_count,
                           "VolumeSizeInGB": args.volume_gb},
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": args.spot,
        "CheckpointConfig": {"S3Uri": f"{base}/runs/{args.run_name or job}",
                             "LocalPath": CHECKPOINTS},
    }


def submit(request: dict, session) -> str:
    """Uploads entry.py where the code channel points, then creates the job; returns its ARN.
    session: a boto3.Session (or anything with the same .client(name))."""
    code = next(c for c in request["InputDataConfig"] if c["ChannelName"] == "code")
    bucket, _, key = code["DataSource"]["S3DataSource"]["S3Uri"][5:].partition("/")
    session.client("s3").put_object(Bucket=bucket, Key=key + ENTRY.name,
                                    Body=ENTRY.read_bytes())
    return session.client("sagemaker").create_training_job(**request)["TrainingJobArn"]


def main(argv: list[str] | None = None, session=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    try:
        request = build_request(args)
    except ConfigError as error:
        p.error(str(error))
    if args.dry_run:
        print(json.dumps(request, indent=2))
        return
    if session is None:
        try:
            import boto3
        except ImportError:
            sys.exit("launch.py: submitting needs boto3 (pip install boto3); --dry_run prints "
                     "the request without it")
        session = boto3.Session(region_name=args.region)
    try:
        arn = submit(request, session)
    except Exception as error:
        if not type(error).__module__.startswith("botocore"):
            raise
        # No credentials, access denied, a rejected request: one line, not a traceback.
        sys.exit(f"launch.py: {type(error).__name__}: {error}")
    job = request["TrainingJobName"]
    print(f"submitted {arn}\ncheckpoints: {request['CheckpointConfig']['S3Uri']}\n"
          f"logs: aws logs tail /aws/sagemaker/TrainingJobs --log-stream-name-prefix {job} "
          "--follow")


if __name__ == "__main__":
    main()

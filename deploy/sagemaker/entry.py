"""Starts training on one instance of a SageMaker training job: one torchrun agent per instance.

SageMaker runs the training image on every instance of the job with this script as its entry
point (launch.py sets ContainerEntrypoint and ships the script in the job's `code` channel, so
the image stays as the Dockerfile builds it). The script reads what SageMaker writes into every
container, /opt/ml/input/config/

    resourceconfig.json   {"current_host": "algo-2", "hosts": ["algo-1", ...],
                           "network_interface_name": "eth0", ...}
    hyperparameters.json  {"config": "32x4", "resume": "true", "set.1": "...", ...}

and replaces itself with

    torchrun --nnodes=<hosts> --nproc_per_node=<GPUs> --node_rank=<index of current_host>
        --master_addr=<first host> --master_port=29500 -m maskrcnn.train --config=32x4 ...

a static rendezvous, as SageMaker's own torch_distributed launch does: the first host holds
torchrun's store and node rank 0, so global rank 0, which writes the checkpoints, always runs
there. Each hyperparameter `name` becomes `--name=value`; `name.K` (K = 1, 2, ...) repeats the
flag in the order of K (hyperparameter keys are unique, --set is repeatable). The SM_HOSTS and
SM_CURRENT_HOST variables belong to the sagemaker-training toolkit, which the image does not
have; resourceconfig.json is there in every container.

    python entry.py --nproc_per_node=8 [--master_port=29500] [--config_dir=DIR] [--dry_run]

Standard library only: it runs with the image's Python before anything of ours is imported.
"""

import argparse
import json
import os
import re
import shlex
from pathlib import Path

CONFIG_DIR = "/opt/ml/input/config"
KEY = re.compile(r"([a-z][a-z0-9_]*)(?:\.([1-9][0-9]*))?")


def read_json(path: Path) -> dict:
    """The JSON object in path; SystemExit with one line naming the file otherwise."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"entry.py: cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"entry.py: {path}: expected a JSON object")
    return value


def training_flags(hyperparameters: dict[str, str]) -> list[str]:
    """`--name=value` for each hyperparameter, sorted by name; `name.K` keys repeat `--name`
    in the order of K."""
    flags = []
    for key, value in hyperparameters.items():
        match = KEY.fullmatch(key)
        if match is None:
            raise SystemExit(f"entry.py: hyperparameter {key!r}: expected a flag name, "
                             "or name.K (K = 1, 2, ...) for a repeated flag")
        flags.append((match[1], int(match[2] or 0), f"--{match[1]}={value}"))
    return [flag for _, _, flag in sorted(flags)]


def node_rank(resource_config: dict) -> tuple[list[str], int]:
    """The job's hosts, in SageMaker's order, and the index of this container's host."""
    hosts, current = resource_config.get("hosts"), resource_config.get("current_host")
    if not hosts or current not in hosts:
        raise SystemExit(f"entry.py: resourceconfig.json: current_host {current!r} is not "
                         f"among hosts {hosts!r}")
    return hosts, hosts.index(current)


def torchrun_command(resource_config: dict, hyperparameters: dict[str, str],
                     nproc_per_node: int, master_port: int = 29500) -> list[str]:
    """The torchrun command line this instance runs (argv, starting with "torchrun")."""
    hosts, rank = node_rank(resource_config)
    return ["torchrun", f"--nnodes={len(hosts)}", f"--nproc_per_node={nproc_per_node}",
            f"--node_rank={rank}", f"--master_addr={hosts[0]}", f"--master_port={master_port}",
            "-m", "maskrcnn.train", *training_flags(hyperparameters)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="entry.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc_per_node", type=int, required=True,
                        help="Training processes per instance: its GPU count.")
    parser.add_argument("--master_port", type=int, default=29500,
                        help="The rendezvous port on the first host.")
    parser.add_argument("--config_dir", type=Path, default=Path(CONFIG_DIR),
                        help="Where SageMaker writes resourceconfig.json and "
                             "hyperparameters.json.")
    parser.add_argument("--dry_run", action="store_true",
                        help="Print the torchrun command instead of running it.")
    args = parser.parse_args(argv)
    resource_config = read_json(args.config_dir / "resourceconfig.json")
    hyperparameters = read_json(args.config_dir / "hyperparameters.json")
    command = torchrun_command(resource_config, hyperparameters, args.nproc_per_node,
                               args.master_port)
    # NCCL's bootstrap and socket transport on the interface SageMaker names, not on a
    # docker or loopback one; an explicit NCCL_SOCKET_IFNAME wins.
    interface = resource_config.get("network_interface_name")
    prefix = ""
    if interface and "NCCL_SOCKET_IFNAME" not in os.environ:
        os.environ["NCCL_SOCKET_IFNAME"] = interface
        prefix = f"NCCL_SOCKET_IFNAME={shlex.quote(interface)} "
    print(f"{resource_config['current_host']}: {prefix}{shlex.join(command)}", flush=True)
    if not args.dry_run:
        # exec: torchrun becomes the container's main process and receives SageMaker's
        # SIGTERM (stop, spot interruption) itself, which it passes on to the workers.
        os.execvp(command[0], command)


if __name__ == "__main__":
    main()

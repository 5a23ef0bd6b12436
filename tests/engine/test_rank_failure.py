"""One rank's failure stops every rank at once (Gloo, two processes on the CPU), and a signal
stops an evaluation between batches.

The collective timeout is 300 s and each run's hang limit 120 s: a run that ends within the
limit was not stopped by the timeout. Every process runs with one thread.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from maskrcnn.config import load_config
from maskrcnn.data.loader import build_dataset, build_train_loader, read_coco, resolve_data_paths
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine import distributed
from maskrcnn.engine.step import unwrap
from maskrcnn.train import build_trainer
from tests.engine.signalling import signal_once_started
from tests.tiny import REPO, TINY, tiny_flags

COLLECTIVE_TIMEOUT_S = 300
HANG_LIMIT_S = 120  # only catches a hang; the runs take about 15 s
RUN = ["solver { epochs: 4 images_per_epoch: 8 warmup_steps: 2 lr_decay_epochs: [3] }",
       "data { num_workers: 2 }"]  # 8 steps of 2 x 2 images


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "MASKRCNN_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": ""}


def _image_only_rank_1_reads(config) -> tuple[Path, int]:
    """(path, steps before it) of the first image that rank 1 of 2 reads and no rank read
    before, after at least one step."""
    paths = resolve_data_paths(config)
    coco = read_coco(paths.train_json, paths.train_images, train=True,
                     num_classes=config.model.num_classes)
    dataset = build_dataset(config, coco, train=True)
    samplers = [build_train_loader(config, dataset, rank=r, world_size=2)[1] for r in range(2)]
    seen: set[int] = set()
    for epoch in range(config.solver.epochs):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        for step, (batch_0, batch_1) in enumerate(zip(*samplers, strict=True)):
            done = epoch * samplers[0].steps_per_epoch + step
            read_0 = {i for i, _ in batch_0}
            fresh = [i for i, _ in batch_1 if i not in seen | read_0]
            if done >= 1 and fresh:
                return coco.records[fresh[0]].path, done
            seen |= read_0 | {i for i, _ in batch_1}
    raise AssertionError("rank 1 reads no image first")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_corrupt_image_on_one_rank_stops_every_rank_and_keeps_the_steps(tmp_path, cache):
    """If this fails, a bad image met by rank 1 alone leaves rank 0 waiting for it until the
    collective timeout, the job's line does not name rank 1 and the image (or there are
    several), or the steps done before it are lost instead of kept in a checkpoint."""
    out = tmp_path / "run"
    config = load_config("shapes", [*TINY, *RUN, f"run {{ output_dir: '{out}' }}"])
    victim, steps = _image_only_rank_1_reads(config)
    original = victim.read_bytes()
    victim.write_bytes(b"corrupt")
    start = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", "-m", "maskrcnn.train",
             f"--dist_timeout_s={COLLECTIVE_TIMEOUT_S}", *tiny_flags(out, *RUN)],
            cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=HANG_LIMIT_S,
            check=False)
    finally:
        victim.write_bytes(original)
    seconds = time.monotonic() - start
    assert result.returncode != 0
    path = ckpt.checkpoint_path(out, steps)
    assert _error_lines(result.stderr) == [
        f"error: rank 1 failed: cannot read image {victim} (listed in "
        f"{victim.parent.parent / 'annotations' / 'instances_train2017.json'}): cannot "
        f"identify image file '{victim}'; stopping all ranks; the {steps} steps done are in "
        f"{path}; continue with --resume"], (seconds, result.stderr[-3000:])
    assert ckpt.checkpoints(out) == [path]
    assert ckpt.load(path)["step"] == steps


class InjectedFailure(RuntimeError):
    pass


def _failing_rank_worker(rank: int, port: int, out: Path, cache: Path) -> None:
    """Trains the tiny run as rank `rank` of 2; rank 1's third step raises (a stand-in for an
    out-of-memory error or a failed kernel). Each rank's error goes to out/rank<r>.txt."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MASKRCNN_CACHE=str(cache))
    torch.set_num_threads(1)
    process = distributed.init(torch.device("cpu"), COLLECTIVE_TIMEOUT_S)
    config = load_config("shapes", [*TINY, *RUN, f"run {{ output_dir: '{out}' }}"])
    trainer = build_trainer(config, process, log=lambda text: None)
    if rank == 1:  # the model's forward, inside DDP's, raises in the third step
        model = unwrap(trainer.model)
        forward = model.forward

        def failing_forward(*args, **kwargs):
            if trainer.step == 2:
                raise InjectedFailure("CUDA out of memory (injected)")
            return forward(*args, **kwargs)

        model.forward = failing_forward
    try:
        trainer.train()
    except Exception as error:  # noqa: BLE001 (recorded for the test)
        (out / f"rank{rank}.txt").write_text(f"{type(error).__name__}: {error}")
    finally:
        distributed.shutdown()


def _free_port() -> int:
    import socket  # noqa: PLC0415
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_exception_on_one_rank_stops_every_rank_and_keeps_the_steps(tmp_path, cache):
    """If this fails, an error on rank 1 in the middle of a step (out of memory, a failed
    kernel) leaves rank 0 waiting until the collective timeout, rank 0's error does not name
    rank 1 and the cause, or rank 0 does not keep the last completed step."""
    out = tmp_path / "run"
    resolve_data_paths(load_config("shapes", [*TINY, *RUN, f"run {{ output_dir: '{out}' }}"]))
    context = mp.start_processes(_failing_rank_worker, args=(_free_port(), out, cache),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + HANG_LIMIT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"still running after {HANG_LIMIT_S} s")
    path = ckpt.checkpoint_path(out, 2)
    assert (out / "rank1.txt").read_text() == (
        "DistributedError: rank 1 failed: InjectedFailure: CUDA out of memory (injected); "
        "stopping all ranks")
    assert (out / "rank0.txt").read_text() == (
        "DistributedError: rank 1 failed: InjectedFailure: CUDA out of memory (injected); "
        f"stopping all ranks; the 2 steps done are in {path}; continue with --resume")
    assert ckpt.load(path)["step"] == 2


def test_sigterm_during_the_evaluation_stops_it_without_results(tmp_path, cache):
    """If this fails, a SIGTERM that arrives as the final evaluation starts does not stop it
    (the run goes on to score, or is killed without its line), or it writes partial results,
    or the run's exit status does not say it was stopped (143)."""
    flags = tiny_flags(tmp_path, "solver { epochs: 1 images_per_epoch: 8 warmup_steps: 1 "
                       "lr_decay_epochs: [1] }")
    result, seconds = signal_once_started(
        ["-m", "maskrcnn.train", *flags], _env(cache),
        lambda process: process.send_signal(signal.SIGTERM),
        started="checkpoint written to", timeout_s=HANG_LIMIT_S)
    path = ckpt.checkpoint_path(tmp_path, 4)
    assert result.returncode == 143, (seconds, result.stderr[-3000:])
    assert (f"received SIGTERM during the evaluation at step 4: stopped it, no results "
            f"written; checkpoint of step 4 in {path}; continue with --resume"
            in result.stdout.splitlines())
    assert not (tmp_path / "coco_results.json").exists()
    assert "box AP" not in result.stdout and "error:" not in result.stderr


_WATCHED_RANK = """
import os, sys, threading, time
import torch
from maskrcnn.engine import distributed
distributed.init(torch.device("cpu"), 300)
if distributed.rank() == 0:
    distributed.watch_for_failures(interval_s=0.1)
    threading.Event().wait(300)  # blocked, as an NCCL rank waiting on its GPU would be
    sys.exit(0)
distributed.publish_failure("cannot read image /data/broken.jpg")
print("published", flush=True)
threading.Event().wait(300)  # stays alive: only the store can tell rank 0
"""


def test_the_watcher_ends_a_blocked_rank_when_another_rank_failed(tmp_path):
    """If this fails, an NCCL job (whose ranks do not notice a peer's end) waits for the
    collective timeout after one rank failed, instead of ending every rank with one line
    naming it; here rank 0 is blocked outside any collective, so only the watcher can end it."""
    port = _free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", _WATCHED_RANK], cwd=REPO,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        assert ranks[1].stdout.readline().strip() == "published"  # an event, not a sleep
        published = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=HANG_LIMIT_S)
        assert time.monotonic() - published < HANG_LIMIT_S
        assert ranks[0].returncode == 2
        assert stderr.strip().splitlines()[-1] == (
            "error: rank 1 failed: cannot read image /data/broken.jpg; stopping all ranks "
            "(the checkpoints written before are kept; continue with --resume)")
    finally:
        for process in ranks:
            process.kill()
            process.communicate()


def test_sigterm_stops_maskrcnn_eval_between_batches_and_writes_nothing(tmp_path, cache):
    """If this fails, `maskrcnn-eval` ignores SIGTERM until it has scored everything (a
    preempted evaluation then runs on, or is killed mid-write), writes a partial results file,
    or does not exit with the signal's status."""
    run = tmp_path / "run"
    trained = subprocess.run([sys.executable, "-m", "maskrcnn.train", *tiny_flags(
        run, "solver { epochs: 1 images_per_epoch: 4 warmup_steps: 1 lr_decay_epochs: [1] }",
        "data { synthetic { num_val: 24 } }")], cwd=REPO, env=_env(cache),
        capture_output=True, text=True, timeout=HANG_LIMIT_S, check=False)
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / "eval"
    result, seconds = signal_once_started(
        ["-m", "maskrcnn.eval", f"--checkpoint={run / 'checkpoints' / 'step_00000002.pt'}",
         f"--output_dir={out}"], _env(cache),
        lambda process: process.send_signal(signal.SIGTERM), started="evaluating ",
        timeout_s=HANG_LIMIT_S)
    assert result.returncode == 143, (seconds, result.stderr[-3000:])
    assert result.stderr.strip().splitlines()[-1] == ("received SIGTERM: evaluation stopped, "
                                                      "no results written")
    assert not (out / "coco_results.json").exists() and "box AP" not in result.stdout

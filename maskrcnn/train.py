"""`python -m maskrcnn.train --config=shapes`: train, evaluate, and draw some predictions.

With no data flags the `shapes` config generates the built-in synthetic dataset once (into
$MASKRCNN_CACHE or ~/.cache/maskrcnn), trains on it, evaluates box and mask AP on its val split
and writes <output_dir>/predictions.png. `--resume` continues from the latest checkpoint in the
output dir that can be read (saying which newer ones it skipped and why); when there are
checkpoints but none can be read, it stops (exit status 2) rather than train over them.

SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C) stops training after the current step with
a checkpoint and one line; the exit status is 143 for SIGTERM, 130 for SIGINT (128 + the
signal's number), and `--resume` continues bit-identically (engine/trainer.py).

Data parallel: `torchrun --nproc_per_node=N -m maskrcnn.train --config=8x4 ...` (one process
per GPU; NCCL on GPUs, Gloo on the CPU). The processes started define the global batch
(N x run.images_per_gpu, whatever run.num_gpus says; the resolved config records N) and so the
LR. Only rank 0 prints, writes the config, events, checkpoints and the picture.

A new run's weights: the backbone body from torchvision's ImageNet file
(model.backbone.weights_path, --backbone_weights; with frozen batch norm and no file, the one
in torch hub's cache, or else the run stops with one line saying where the file comes from;
`random` asks for a random body), then `--init_from` (fine-tuning: our checkpoint or a
torchvision maskrcnn_resnet50_fpn state dict; every tensor whose name and shape fit, the rest
afresh, one line says which) over it. Both are read and checked before any data. `--resume`
wins over both when the output dir has a checkpoint, so the same command restarts a
preempted fine-tune.
"""

import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from absl import flags

from maskrcnn.cli import run_command
from maskrcnn.config import Config, ConfigError, to_text
from maskrcnn.config.config_pb2 import FROZEN_BN
from maskrcnn.config.flags import FLAGS, config_from_flags
from maskrcnn.config.validate import RANDOM_WEIGHTS
from maskrcnn.data.coco import describe
from maskrcnn.data.loader import (
    build_dataset,
    build_eval_loader,
    build_train_loader,
    read_coco,
    resolve_data_paths,
)
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine import distributed
from maskrcnn.engine.evaluate import Evaluator
from maskrcnn.engine.fallback import verify_kernels
from maskrcnn.engine.hooks import (
    STOP_SIGNALS,
    AbruptExit,
    Checkpoints,
    Evaluation,
    Hook,
    LogLines,
    ProgressBar,
    StopOnSignal,
    TrainingStopped,
    workers_ignore_stop_signals,
)
from maskrcnn.engine.predictions import draw_dataset_predictions
from maskrcnn.engine.solver import make_schedule
from maskrcnn.engine.step import TrainStep, unwrap
from maskrcnn.engine.trainer import Trainer
from maskrcnn.model.backbone import (
    cached_imagenet,
    missing_imagenet_message,
    read_imagenet,
)
from maskrcnn.runtime import Runtime, resolve_device

flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in the output dir "
                  "(it wins over --init_from and the backbone weights).")
flags.DEFINE_string("init_from", None, "Start a new run (step 0, fresh optimizer and "
                    "schedule) from these weights: a checkpoint of maskrcnn-train or a "
                    "torchvision maskrcnn_resnet50_fpn state dict (e.g. "
                    "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth). Every tensor whose name and "
                    "shape fit is loaded; the others (the class layers, for another number "
                    "of classes) start afresh.")
flags.DEFINE_integer("debug_exit_after_step", 0, "Testing: end the process abruptly (as if "
                     "killed) right after this step.")
flags.DEFINE_integer("debug_exit_rank", -1, "Testing: only this rank ends at "
                     "--debug_exit_after_step (-1: every rank).")
PREVIEW_IMAGES = 4  # val images drawn with their predictions at the end


def fit_world_size(config: Config, world_size: int) -> tuple[Config, str | None]:
    """The config with run.num_gpus set to the number of processes actually training, and a
    note for the log when that changed it.

    The processes started define the global batch (world_size x run.images_per_gpu) and so
    the LR (solver.base_lr_per_image x global batch); epochs count images, so the schedule
    still covers the same data, in more or fewer steps. warmup_steps stays in steps.
    """
    if config.run.num_gpus == world_size:
        return config, None
    fitted = Config()
    fitted.CopyFrom(config)
    fitted.run.num_gpus = world_size
    batch = world_size * config.run.images_per_gpu
    return fitted, (f"note: the config's run.num_gpus is {config.run.num_gpus} but "
                    f"{world_size} process(es) are training: global batch {world_size} x "
                    f"{config.run.images_per_gpu} = {batch} images, LR "
                    f"{config.solver.base_lr_per_image:g} x {batch} = "
                    f"{config.solver.base_lr_per_image * batch:g}")


def write_config(config: Config, output_dir: Path, runtime: Runtime) -> Path:
    """Writes the resolved config (every field explicit) atomically to output_dir, closing
    with a comment that says what each op runs on this run's device (the config keeps its
    choices, AUTO included, so that it means the same on another device)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "config.pbtxt"
    tmp = path.with_suffix(".pbtxt.tmp")
    tmp.write_text(to_text(config) + f"# this run: {runtime.describe()}\n")
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class StartingWeights:
    """What a new run's model starts from, read and checked before any data: torchvision's
    ImageNet body (imagenet, from imagenet_path), then --init_from's weights (init) over it;
    None where there is none."""

    imagenet_path: str = ""
    imagenet: dict[str, torch.Tensor] | None = None
    init: ckpt.InitWeights | None = None

    def load(self, model: torch.nn.Module, say: Callable[[str], None]) -> None:
        """Puts the weights into model (not wrapped), saying what it loaded."""
        if self.imagenet is not None:
            model.backbone.body.load_state_dict(self.imagenet)
            say(f"backbone body: ImageNet weights from {self.imagenet_path}")
        if self.init is not None:
            say(ckpt.load_init_weights(model, self.init))


def starting_weights(config: Config, init_from: str | None, source: str,
                     say: Callable[[str], None] = print) -> tuple[Config, StartingWeights]:
    """The config with the ImageNet file the run uses, and the weights, read and checked.

    A frozen-batch-norm body with model.backbone.weights_path empty and no --init_from (a
    run from scratch) takes torchvision's file from torch hub's cache
    (torch.hub.get_dir()/checkpoints, recorded in the returned config) or stops with one line
    (ConfigError, naming source) that says where the file comes from; RANDOM_WEIGHTS keeps the
    body random. A missing, damaged or unfitting file stops with one line."""
    init = ckpt.read_init_weights(Path(init_from)) if init_from else None
    backbone = config.model.backbone
    path = backbone.weights_path
    if path == RANDOM_WEIGHTS:
        path = ""
    elif not path and backbone.norm == FROZEN_BN and init is None:
        hub = Path(torch.hub.get_dir())
        found = cached_imagenet(backbone.depth, hub)
        if found is None:
            raise ConfigError(f"{source}: {missing_imagenet_message(backbone.depth, hub)}")
        path = str(found)
        resolved = Config()
        resolved.CopyFrom(config)
        resolved.model.backbone.weights_path = path
        config = resolved
        say(f"model.backbone.weights_path is empty: using {path}, torchvision's "
            f"ResNet-{backbone.depth} ImageNet file in torch hub's cache")
    imagenet = read_imagenet(path, backbone.depth) if path else None
    return config, StartingWeights(path, imagenet, init)


def build_trainer(config: Config, process: distributed.Process, *,
                  log: Callable[[str], None] = print, extra_hooks: list[Hook] | None = None,
                  start: StartingWeights | None = None) -> Trainer:
    """One process's training, each part built once, in order: the config fitted to the
    number of processes, the Runtime, the datasets and loaders, the schedule and TrainStep
    (its model given the start weights, if any: starting_weights), the evaluator, the hooks,
    the Trainer. Rank 0 alone logs (log) and writes the resolved config. extra_hooks run
    after the others (tests: AbruptExit)."""
    device, rank, world_size = process.device, process.rank, process.world_size
    say = log if process.is_main else (lambda text: None)
    config, note = fit_world_size(config, world_size)
    output_dir = Path(config.run.output_dir)
    runtime = verify_kernels(Runtime.for_config(config, device, rank, world_size), device)
    say(f"on {device}: {runtime.describe()}")
    if process.is_main:
        say(f"resolved config written to {write_config(config, output_dir, runtime)}")
    if note:
        say(note)
    # The synthetic set, if used, is generated by each node's first process alone.
    paths = distributed.node_main_first(process, lambda: resolve_data_paths(config))
    torch.manual_seed(config.run.seed)  # the model's initial weights
    num_classes = config.model.num_classes
    train_coco = read_coco(paths.train_json, paths.train_images, train=True,
                           num_classes=num_classes,
                           bad_annotations=config.data.bad_annotations)
    say(describe("train", train_coco))
    val_coco = (read_coco(paths.val_json, paths.val_images, train=False,
                          num_classes=num_classes,
                          bad_annotations=config.data.bad_annotations)
                if paths.val_json else None)
    if val_coco is not None:
        say(describe("val", val_coco))
    dataset = build_dataset(config, train_coco, train=True)
    loader, sampler = build_train_loader(config, dataset, rank=rank, world_size=world_size)
    workers_ignore_stop_signals(loader)

    schedule = make_schedule(config, len(dataset), sampler.steps_per_epoch)
    step = TrainStep(config, device, schedule, runtime)
    if start is not None:
        start.load(unwrap(step.model), say)

    evaluator = None
    if val_coco is not None:
        val_loader = workers_ignore_stop_signals(build_eval_loader(
            config, build_dataset(config, val_coco, train=False), rank=rank,
            world_size=world_size))
        evaluator = Evaluator(step.model, val_loader, val_coco, output_dir, device,
                              autocast_dtype=step.autocast_dtype,
                              coco_eval=config.run.coco_eval, log=say)

    log_lines, stop = LogLines(config.run.log_period_steps), StopOnSignal()
    hooks = [ProgressBar(), log_lines, stop, Checkpoints(config.run.checkpoint_period_steps,
                                                         config.run.checkpoint_period_epochs)]
    if evaluator is not None:
        hooks.append(Evaluation(config.run.eval_period_epochs, log_lines.publish,
                                stop.received))
    return Trainer(step, loader, hooks + (extra_hooks or []), train_coco=train_coco,
                   evaluator=evaluator, log=log)


def train(config: Config, process: distributed.Process, start: StartingWeights) -> None:
    """Everything one process of the job does (the whole job with one process)."""
    say = print if process.is_main else (lambda *args: None)
    exit_hooks = ([AbruptExit(FLAGS.debug_exit_after_step, FLAGS.debug_exit_rank)]
                  if FLAGS.debug_exit_after_step else [])
    trainer = build_trainer(config, process, extra_hooks=exit_hooks, start=start)
    if FLAGS.resume:
        resumed = trainer.resume()
        if resumed is None:
            say(f"--resume: no checkpoint in {trainer.output_dir / ckpt.CHECKPOINT_DIR}; "
                "starting " + ("from --init_from's weights" if start.init else "from scratch"))
        elif start.init is not None:
            say(f"--resume continues from {resumed}: --init_from's weights are replaced")
    result = trainer.train()
    if result.metrics:
        say(f"box AP {result.metrics['bbox/AP']:.3f}, mask AP {result.metrics['segm/AP']:.3f} "
            f"on {trainer.val_coco.json_path}")
    if trainer.val_coco is not None and process.is_main:
        picture = trainer.output_dir / "predictions.png"
        draw_dataset_predictions(trainer, PREVIEW_IMAGES).save(picture)
        print(f"predictions on {PREVIEW_IMAGES} val images drawn in {picture}")


def main() -> None:
    config = config_from_flags()
    process = distributed.init(resolve_device(FLAGS.device), FLAGS.dist_timeout_s)
    try:
        config, start = starting_weights(
            config, FLAGS.init_from, f"--config={FLAGS.config}",
            print if process.is_main else (lambda text: None))
        train(config, process, start)
    except TrainingStopped:
        # From here the process only ends. Under torchrun the first worker to end makes it
        # send SIGTERM to the others, which must not cut their exit (and its status) short.
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        raise
    finally:
        distributed.shutdown()


def run() -> None:
    """Console-script entry point (`maskrcnn-train`)."""
    run_command(main)


if __name__ == "__main__":
    run()

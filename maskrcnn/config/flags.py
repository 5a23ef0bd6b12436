"""The absl flags every command shares, and the config they resolve to.

Precedence, lowest first: the --config file (and its `base` chain), --data_dir, the explicit
--train_json/--train_images/--val_json/--val_images, --backbone_weights, --output_dir, then
each --set override.
"""

from pathlib import Path

from absl import flags

from maskrcnn.config import config_pb2
from maskrcnn.config.errors import ConfigError
from maskrcnn.config.loader import Layer, build_config, parse_text, read_layers

flags.DEFINE_string("config", "shapes", "A named config (e.g. shapes, 8x4, 32x4) or a .pbtxt path.")
flags.DEFINE_multi_string(
    "set", [], "Text-format override applied after the config, e.g. "
    "--set='solver { base_lr_per_image: 0.0025 }'. Repeatable; later ones win."
)
flags.DEFINE_string(
    "data_dir", None, "A COCO-style folder: annotations/instances_{train,val}2017.json, "
    "train2017/, val2017/."
)
flags.DEFINE_string("train_json", None, "Training annotations (COCO instances json).")
flags.DEFINE_string("train_images", None, "Folder of the training images.")
flags.DEFINE_string("val_json", None, "Validation annotations (COCO instances json).")
flags.DEFINE_string("val_images", None, "Folder of the validation images.")
flags.DEFINE_string(
    "backbone_weights", None, "The backbone's ImageNet weights: torchvision's ResNet file "
    "(resnet50-*.pth) on local disk; the same setting as model.backbone.weights_path. "
    "Nothing is downloaded."
)
flags.DEFINE_string("output_dir", None, "Where checkpoints, logs and the resolved config go.")
flags.DEFINE_string("device", "auto", "cpu, cuda, cuda:K, or auto (the GPU if there is one).")
flags.DEFINE_string("checkpoint", None, "A checkpoint file (eval, predict). Its config is the "
                    "base unless --config is given.")
# Long enough for rank 0 to score a COCO val set (pycocotools: minutes for 5000 images) while
# the other ranks wait for it in their next collective.
flags.DEFINE_float("dist_timeout_s", 600, "Under torchrun: seconds any collective may wait "
                   "for the other ranks before the job stops with an error naming the rank "
                   "and the operation. Must exceed rank 0's COCO scoring time at evaluations.")

flags.DEFINE_string("json_out", None, "maskrcnn-benchmark and maskrcnn-check: also write the "
                    "report (the check's rows) as JSON to this file.")

FLAGS = flags.FLAGS
DATA_FLAGS = ("train_json", "train_images", "val_json", "val_images")


def _data_dir_paths(data_dir: str) -> dict[str, str]:
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"--data_dir={data_dir}: no such folder")
    return {
        "train_json": str(root / "annotations" / "instances_train2017.json"),
        "train_images": str(root / "train2017"),
        "val_json": str(root / "annotations" / "instances_val2017.json"),
        "val_images": str(root / "val2017"),
    }


def data_flag_paths() -> dict[str, str]:
    """The data paths --data_dir and the explicit data flags name (the latter win)."""
    paths = _data_dir_paths(FLAGS.data_dir) if FLAGS.data_dir else {}
    paths.update({name: getattr(FLAGS, name) for name in DATA_FLAGS if getattr(FLAGS, name)})
    return paths


def config_from_flags(base_text: str | None = None, base_source: str = "", *,
                      data: bool = True) -> config_pb2.Config:
    """The resolved config for this process's flags (call after absl has parsed them).

    base_text: a resolved config (e.g. a checkpoint's) used as the first layer instead of
    --config's file, unless --config was given explicitly.
    data: False leaves --data_dir and the data flags out, for a command that reads them
    itself (data_flag_paths).
    """
    if base_text is not None and not FLAGS["config"].present:
        layers = [Layer(base_source, parse_text(base_text, base_source))]
    else:
        layers = read_layers(FLAGS.config)
    if data and FLAGS.data_dir:
        layer = config_pb2.Config()
        for name, value in _data_dir_paths(FLAGS.data_dir).items():
            setattr(layer.data, name, value)
        layers.append(Layer(f"--data_dir={FLAGS.data_dir}", layer))
    for name in DATA_FLAGS if data else ():
        if getattr(FLAGS, name):
            layer = config_pb2.Config()
            setattr(layer.data, name, getattr(FLAGS, name))
            layers.append(Layer(f"--{name}", layer))
    if FLAGS.backbone_weights:
        layer = config_pb2.Config()
        layer.model.backbone.weights_path = FLAGS.backbone_weights
        layers.append(Layer("--backbone_weights", layer))
    if FLAGS.output_dir:
        layer = config_pb2.Config()
        layer.run.output_dir = FLAGS.output_dir
        layers.append(Layer("--output_dir", layer))
    for index, text in enumerate(FLAGS.set, start=1):
        source = f"--set #{index} ({text.strip()!r})"
        layers.append(Layer(source, parse_text(text, source)))
    config = build_config(layers)
    if not config.run.output_dir:
        config.run.output_dir = str(Path("runs") / Path(FLAGS.config).stem)
    return config

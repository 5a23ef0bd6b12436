"""`maskrcnn-export --checkpoint=PATH --format=pt2|aoti|onnx --output=FILE`: the trained model's
whole inference as one program at static shapes, to serve without our package
(docs/deploy.md).

Writes FILE (pt2: torch.export.save; aoti: an AOTInductor package; onnx: an ONNX model), and
beside it FILE.json (the inputs' shapes, how to resize images, the classes, the config) and
paste_masks.py (torch only: resizing images onto the canvas, pasting the box-local masks at
an image's resolution). The program maps uint8[N, 3, H, W] images and their int64[N, 2] sizes
to boxes, scores, classes, a validity mask and box-local masks (engine/deploy.py).
"""

import json
import time
from pathlib import Path

from absl import flags

from maskrcnn.cli import run_command
from maskrcnn.config import ConfigError
from maskrcnn.config.flags import FLAGS, config_from_flags
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine import deploy
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.runtime import resolve_device

flags.DEFINE_enum("format", "pt2", deploy.FORMATS, "pt2 (torch.export), aoti (AOTInductor "
                  "package) or onnx.")
flags.DEFINE_string("canvas", None, "HEIGHTxWIDTH the program takes (default: the config's "
                    "first canvas).")
flags.DEFINE_integer("batch", 1, "Images per call of the program.", lower_bound=1)
flags.DEFINE_string("output", None, "The file to write (aoti: ending in .pt2).")
flags.DEFINE_bool("trim_masks", False, "Run the mask head on the detection slots up to the "
                  "last one used in the batch, not on all D: faster on a CPU where images "
                  "hold fewer detections; the program then has a data-dependent size.")


def main() -> None:
    if not FLAGS.checkpoint:
        raise ConfigError("--checkpoint is required")
    if not FLAGS.output:
        raise ConfigError("--output is required")
    state = ckpt.load(Path(FLAGS.checkpoint))
    config = config_from_flags(state["config"], f"{FLAGS.checkpoint} (its config)")
    device = resolve_device(FLAGS.device if FLAGS.device != "auto" else "cpu")
    first = config.data.canvas[0]
    canvas = deploy.parse_canvas(FLAGS.canvas) if FLAGS.canvas else (first.height, first.width)
    output = Path(FLAGS.output)
    if FLAGS.format == "aoti" and output.suffix != ".pt2":
        raise ConfigError(f"--output={output}: an aoti package's name must end in .pt2 "
                          "(AOTInductor's rule)")
    if not output.parent.is_dir():
        raise ConfigError(f"--output={output}: no such folder {output.parent}")
    config = deploy.at_canvas(config, canvas)
    model = build_model(config, deploy.export_runtime(FLAGS.trim_masks))
    ckpt.load_model_state(model, state["model"], FLAGS.checkpoint)
    model.to(device)
    inputs = deploy.example_inputs(config, canvas, FLAGS.batch, device)
    began = time.perf_counter()
    program = deploy.export_program(model, inputs, onnx=FLAGS.format == "onnx")
    deploy.save(program, FLAGS.format, output, inputs)
    info = deploy.metadata(config, FLAGS.format, FLAGS.batch, device.type,
                           state["category_ids"], state["class_names"])
    Path(f"{output}.json").write_text(json.dumps(info, indent=1) + "\n")
    helper = deploy.write_helper(output.parent)
    print(f"{output}: {FLAGS.format}, {FLAGS.batch} x 3 x {canvas[0]} x {canvas[1]} uint8 images "
          f"on {device}, {time.perf_counter() - began:.1f} s; {output}.json, {helper}")


def run() -> None:
    """Console-script entry point (`maskrcnn-export`)."""
    run_command(main)


if __name__ == "__main__":
    run()

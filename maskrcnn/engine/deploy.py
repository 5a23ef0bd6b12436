"""The whole inference as one program at static shapes, for serving without our package:
torch.export (pt2), AOTInductor (aoti) and ONNX (onnx) files, and loading them back.

Shape legend: N images (the program's batch), H x W its canvas, D detections per image,
M mask side.

The program takes uint8[N, 3, H, W] images (each resized as data/transforms.py resizes and
padded with zeros at the bottom and right) and int64[N, 2] their sizes (height, width) on the
canvas, and returns, as the eval-mode model does:
    boxes float32[N, D, 4] (x1, y1, x2, y2) in canvas pixels, scores float32[N, D],
    classes int64[N, D] in 1..K (0 in empty slots), valid bool[N, D] (the valid ones first,
    by descending score), masks float32[N, D, M, M] box-local probabilities.
It is traced along a GPU's code path (Runtime.gpu_path: static sizes, NMS without host
reads, the gather ROIAlign) on either device, and our `torch.library` ops are traced through
(`_InlineOps`), so that the file names no operator of ours. NMS is traced as the "loop"
method (ops/nms.py: one `while_loop`, the same kept boxes as the "torch" method that the
model was built with), whose graph does not grow with the candidate count. Pasting the
box-local masks at an image's own resolution needs that resolution, which differs per image,
so it stays out of the program: `write_helper` writes a torch-only module beside the file
(paste_masks.py) made of our op's own source.
"""

import contextlib
import dataclasses
import inspect
import json
import textwrap
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from maskrcnn.config import Config, ConfigError, to_text
from maskrcnn.data import transforms
from maskrcnn.engine.evaluate import MASK_THRESHOLD
from maskrcnn.model.maskrcnn import MaskRCNN
from maskrcnn.ops import paste_masks as paste_module
from maskrcnn.ops.nms import batched_nms_fixed
from maskrcnn.ops.proposals import _generate_proposals
from maskrcnn.ops.roi_align_gather import bins_to_rois, roi_align_levels, table_and_taps
from maskrcnn.runtime import Runtime

FORMATS = ("pt2", "aoti", "onnx")
OUTPUTS = ("boxes", "scores", "classes", "valid", "masks")
# The ops the inference path calls, each replaced by its Python definition while tracing.
INLINED = (batched_nms_fixed, _generate_proposals, roi_align_levels)
# Inductor settings of an aoti package with freeze=True: parameters become constants, so
# that convolutions get their weights pre-packed for oneDNN (CPU) and constants are folded.
FREEZING = {"freezing": True}
HELPER = "paste_masks.py"  # the torch-only module written beside every exported file
# ONNX opset of the export (torch.onnx's default in torch 2.14; onnxruntime 1.32 runs it).
ONNX_OPSET = 18


@dataclasses.dataclass(frozen=True)
class _TrimmedMasks(Runtime):
    """Runtime.gpu_path(), except that the mask head runs on the detection slots up to the last
    one some image uses, as on a CPU (Runtime.slots): a size read from the data, which
    torch.export keeps as an unbacked symbolic size (U in 1..D)."""

    def slots(self, used: torch.Tensor) -> slice | torch.Tensor:
        if used.dim() != 2:  # only the detections' bool[N, D] at inference
            return super().slots(used)
        position = torch.arange(1, used.shape[1] + 1, device=used.device)
        last = (used.any(0) * position).max().item()
        torch._check(last >= 0)
        torch._check(last <= used.shape[1])
        return slice(0, torch.sym_max(last, 1))


def export_runtime(trim_masks: bool = False) -> Runtime:
    """The Runtime to build an exported model with: the static path (Runtime.gpu_path), or
    with trim_masks its mask head on the used detection slots only (a data-dependent size:
    less work where images hold fewer than D detections, no longer one static shape)."""
    return _TrimmedMasks(trim_slots=False, nms="torch") if trim_masks else Runtime.gpu_path()


class InferenceProgram(nn.Module):
    """The eval-mode model as a function of tensors only: (images, image_sizes) -> the tuple
    OUTPUTS (module docstring). The model must be built with a static Runtime. With
    `autocast` (torch.bfloat16), the forward runs under CPU autocast to that type (inside the
    forward, so that torch.export records it)."""

    def __init__(self, model: MaskRCNN, autocast: torch.dtype | None = None):
        super().__init__()
        if model.runtime.trim_slots or model.runtime.nms not in ("torch",):
            raise ValueError("export needs the static, sync-free path: build the model with "
                             "export_runtime()")
        self.model = model.eval()
        self.autocast = autocast

    def forward(self, images: torch.Tensor,
                image_sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # No autocast region at all in float32: torch.export would record a disabled one.
        with (torch.autocast("cpu", dtype=self.autocast) if self.autocast is not None
              else contextlib.nullcontext()):
            detections = self.model(images, image_sizes)
        return tuple(detections[name] for name in OUTPUTS)


class _InlineOps(TorchFunctionMode):
    """Calls each op of INLINED as its Python definition, so tracing records aten ops only."""

    def __init__(self, onnx: bool = False):
        super().__init__()
        self.table = {op._opoverload: op._init_fn for op in INLINED}
        self.table[batched_nms_fixed._opoverload] = _nms_as_loop
        if onnx:
            self.table[roi_align_levels._opoverload] = _roi_align_by_gathers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        definition = self.table.get(func)
        if definition is None:
            return func(*args, **(kwargs or {}))
        with self:  # the definition may call another inlined op (proposals -> NMS)
            return definition(*args, **(kwargs or {}))


def _nms_as_loop(boxes, scores, valid, groups, iou_threshold, max_out, method):
    """batched_nms_fixed as traced: its "loop" method in place of the "torch" loop (the same
    kept boxes, tests/ops/test_nms.py), which would unroll into one step per candidate."""
    method = "loop" if method == "torch" else method
    return batched_nms_fixed._init_fn(boxes, scores, valid, groups, iou_threshold, max_out,
                                      method)


def _roi_align_by_gathers(features, rois, levels, output_size, spatial_scales, sampling_ratio,
                          aligned):
    """roi_align_levels as traced for ONNX: the op's own taps (ops/roi_align_gather.py), the K
    weighted taps of each bin summed one tap at a time (K gathers of [R*P*P, C] rows). The
    op's embedding_bag has no direct ONNX translation: torch.onnx writes a Loop over the bags
    that inserts into a sequence (seconds per call at the `shapes` size, quadratic)."""
    table, index, weight = table_and_taps(features, rois, levels, output_size, spatial_scales,
                                          sampling_ratio, aligned)  # index, weight: (R*P*P, K)
    pooled = table[index[:, 0]] * weight[:, :1]
    for k in range(1, index.shape[1]):
        pooled = pooled + table[index[:, k]] * weight[:, k:k + 1]
    return bins_to_rois(pooled, rois.shape[0], output_size)


def example_inputs(config: Config, canvas: tuple[int, int], batch: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero images on the canvas, each of the largest size the config's resize gives there:
    the program's input shapes and dtypes (their values do not shape the trace)."""
    size = transforms.resized_size(*canvas, config.data.short_side, config.data.max_long_side,
                                   canvas)
    images = torch.zeros(batch, 3, *canvas, dtype=torch.uint8, device=device)
    return images, torch.tensor([size] * batch, dtype=torch.int64, device=device)


def export_program(model: MaskRCNN, inputs: tuple[torch.Tensor, torch.Tensor],
                   autocast: torch.dtype | None = None, onnx: bool = False):
    """torch.export's ExportedProgram of InferenceProgram(model, autocast) at the inputs'
    shapes, with our ops traced through (no `maskrcnn::` operator left in it); with autocast
    (torch.bfloat16), its casts are explicit ops of the program. `onnx`: for the onnx format
    (ROIAlign as row gathers, _roi_align_by_gathers)."""
    with torch.no_grad(), _InlineOps(onnx):
        program = torch.export.export(InferenceProgram(model, autocast), inputs, strict=False)
    if autocast is not None:
        program = program.run_decompositions()  # the autocast region as explicit casts
    left = {str(node.target) for node in program.graph.nodes
            if str(node.target).startswith("maskrcnn.")}
    if left:
        raise RuntimeError(f"ops of ours left in the exported program: {sorted(left)}")
    return program


def _onnx_sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable for the ONNX exporter (torch.onnx has no translation for it): ONNX's
    TopK over the whole axis, which breaks ties by the lower index (the ONNX spec), as a
    stable sort does. Integer and boolean keys are ranked as int32 (onnxruntime's TopK takes
    no uint8 or bool)."""
    from onnxscript import ir  # noqa: PLC0415 (an optional dependency: the onnx format only)
    from onnxscript import opset18 as op  # noqa: PLC0415

    dtype = self.dtype
    keys = self if dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT64,
                             ir.DataType.INT32) else op.Cast(self, to=ir.DataType.INT32)
    length = op.Reshape(op.Gather(op.Shape(keys), dim, axis=0), op.Constant(value_ints=[1]))
    values, indices = op.TopK(keys, length, axis=dim, largest=descending, sorted=True)
    return (values if keys is self else op.Cast(values, to=dtype)), indices


def save(program, fmt: str, path: Path, inputs: tuple[torch.Tensor, torch.Tensor],
         freeze: bool = False) -> None:
    """Writes the ExportedProgram in format `fmt` (one of FORMATS) to path; an aoti package
    compiled with FREEZING where `freeze`."""
    if fmt == "pt2":
        torch.export.save(program, path)
    elif fmt == "aoti":
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs=FREEZING if freeze else None)
    elif fmt == "onnx":
        onnx_program = torch.onnx.export(
            program, inputs, dynamo=True, opset_version=ONNX_OPSET,
            input_names=["images", "image_sizes"], output_names=list(OUTPUTS),
            custom_translation_table={torch.ops.aten.sort.stable: _onnx_sort_stable},
            optimize=False, verbose=False)
        onnx_program.save(str(path))
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def at_canvas(config: Config, canvas: tuple[int, int]) -> Config:
    """A copy of config whose only canvas is `canvas` (the program's)."""
    exported = Config()
    exported.CopyFrom(config)
    del exported.data.canvas[:]
    exported.data.canvas.add(height=canvas[0], width=canvas[1])
    return exported


def metadata(config: Config, fmt: str, batch: int, device: str, category_ids: list[int],
             class_names: list[str]) -> dict:
    """What a user (and `maskrcnn-predict --model`) needs beside the program of a config at
    its one canvas (at_canvas): its inputs' shapes, how images are resized, the classes, and
    the config."""
    canvas = config.data.canvas[0]
    return {
        "format": fmt, "batch": batch, "canvas": [canvas.height, canvas.width],
        "device": device, "short_side": config.data.short_side,
        "max_long_side": config.data.max_long_side, "mask_threshold": MASK_THRESHOLD,
        "outputs": list(OUTPUTS), "category_ids": list(category_ids),
        "class_names": list(class_names), "config": to_text(config),
    }


def _source(function) -> str:
    """A function's source without its decorators."""
    lines = inspect.getsource(function).splitlines(keepends=True)
    return "".join(lines[next(i for i, line in enumerate(lines) if line.startswith("def")):])


def helper_source() -> str:
    """The torch-only module written beside an exported file: resizing an image onto the
    canvas as our data pipeline does, and pasting box-local masks at an image's resolution
    with our op's own code (ops/paste_masks.py)."""
    parts = [
        '"""Written by maskrcnn-export beside the exported program; needs torch only.\n\n'
        "prepare: an image uint8[h, w, 3] -> (uint8[3, H, W] on the canvas, (height, width)\n"
        "  resized), as maskrcnn resizes (bilinear, antialiased) and pads (zeros).\n"
        "paste_masks: box-local mask probabilities float[N, D, M, M] and boxes float[N, D, 4]\n"
        "  in an image's pixels -> float32[N, D, height, width] (torchvision's semantics).\n"
        '"""\n\nimport torch\nfrom torch.nn import functional as F\n\n'
        f"PADDING = {paste_module.PADDING}\n\n",
        _source(transforms.resized_size).replace("Size", "tuple[int, int]"),
        textwrap.dedent('''

            def prepare(image, canvas, short_side: int, max_long_side: int):
                """uint8[h, w, 3] (numpy or torch) -> uint8[3, H, W] tensor, (height, width)."""
                pixels = image if isinstance(image, torch.Tensor) else torch.tensor(image)
                pixels = pixels.permute(2, 0, 1)[None]  # (h, w, 3) -> (1, 3, h, w)
                size = resized_size(pixels.shape[2], pixels.shape[3], short_side,
                                    max_long_side, tuple(canvas))
                if tuple(pixels.shape[2:]) != size:
                    pixels = F.interpolate(pixels.contiguous(memory_format=torch.channels_last),
                                           size=size, mode="bilinear", antialias=True,
                                           align_corners=False)
                out = torch.zeros(3, *canvas, dtype=torch.uint8)
                out[:, :size[0], :size[1]] = pixels[0]
                return out, size
        '''),
    ]
    for function in (paste_module._expanded_int_boxes, paste_module._interpolation,
                     paste_module._has_area, paste_module.paste_masks._init_fn):
        parts.append("\n\n" + _source(function))
    return "".join(parts)


def write_helper(directory: Path) -> Path:
    path = directory / HELPER
    path.write_text(helper_source())
    return path


def parse_canvas(text: str) -> tuple[int, int]:
    """--canvas=HxW as (H, W); raises ConfigError naming the flag."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        height = width = 0
    if height <= 0 or width <= 0:
        raise ConfigError(f"--canvas={text}: must be HEIGHTxWIDTH, e.g. 800x1344")
    # The FPN's coarsest level (P6, stride 64) halves P5: a canvas must divide by its stride.
    if height % 32 or width % 32:
        raise ConfigError(f"--canvas={text}: height and width must be multiples of 32")
    return height, width


def load_program(path: Path, fmt: str, threads: int | None = None):
    """The program in `path` as a function (images, image_sizes) -> the tuple OUTPUTS of CPU
    tensors (or of the device's, pt2 and aoti). ONNX runs in onnxruntime's CPU provider with
    every graph optimisation and, where given, `threads` intra-op threads that do not spin
    (default: onnxruntime's choice)."""
    if fmt == "pt2":
        module = torch.export.load(str(path)).module()
        return lambda images, image_sizes: tuple(module(images, image_sizes))
    if fmt == "aoti":
        runner = torch._inductor.aoti_load_package(str(path))
        return lambda images, image_sizes: tuple(runner(images, image_sizes))
    import onnxruntime  # noqa: PLC0415 (optional: pip install maskrcnn[export])
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        # Threads that sleep when idle: spinning ones take the cores from torch's threads
        # running beside them (the benchmark's sides take turns in one process).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor, image_sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # onnxruntime's Python API takes host arrays (its CPU provider runs there anyway).
        out = session.run(None, {"images": images.cpu().numpy(),
                                 "image_sizes": image_sizes.cpu().numpy()})
        return tuple(torch.from_numpy(o) for o in out)

    return run


class ExportedModel(nn.Module):
    """An exported file called as the eval-mode model: (images, image_sizes) -> detections
    dict, for any number of images on the program's canvas (padded to its batch, split into
    several calls where more). Used by `maskrcnn-predict --model`."""

    def __init__(self, path: Path):
        super().__init__()
        info_path = Path(f"{path}.json")
        try:
            self.info = json.loads(info_path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"--model={path}: cannot read {info_path} (written beside the "
                              f"program by maskrcnn-export): {error}") from None
        fmt = self.info["format"]
        try:
            self.program = load_program(path, fmt)
        except (OSError, RuntimeError, ValueError) as error:
            raise ConfigError(f"--model={path}: cannot load the {fmt} program: "
                              f"{str(error).splitlines()[0]}") from None
        self.batch = self.info["batch"]

    def train(self, mode: bool = True) -> "ExportedModel":
        """Only the flag: the program is inference alone (and torch.export's refuses train)."""
        self.training = mode
        return self

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> dict:
        if list(images.shape[-2:]) != self.info["canvas"]:
            raise ConfigError(f"images of {tuple(images.shape[-2:])} for a program exported "
                              f"at canvas {self.info['canvas']}")
        n = images.shape[0]
        chunks = []
        for start in range(0, n, self.batch):
            part, sizes = images[start:start + self.batch], image_sizes[start:start + self.batch]
            missing = self.batch - part.shape[0]  # padded with copies of the first image
            part = torch.cat([part, part[:1].expand(missing, -1, -1, -1)])
            sizes = torch.cat([sizes, sizes[:1].expand(missing, -1)])
            chunks.append([o[:self.batch - missing] for o in self.program(part, sizes)])
        return {name: torch.cat([c[i] for c in chunks]).to(images.device)
                for i, name in enumerate(OUTPUTS)}

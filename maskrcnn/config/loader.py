"""Reading a run's config: named or file configs, `base` chains, text-format overrides.

A config is built from layers, first to last: the files of the `base` chain (the deepest base
first), the file named by --config, then each --set override. Later layers replace what earlier
ones set; a repeated field is replaced as a whole, never appended to. After merging, repeated
fields left empty get the recipe values below, every field is made explicit, and the result is
validated (validate.py). Every error is a ConfigError whose one-line message names the file (or
override) and the field.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from maskrcnn.config import config_pb2
from maskrcnn.config.errors import ConfigError
from maskrcnn.config.validate import validate

NAMED_DIR = Path(__file__).resolve().parent / "named"

# Recipe values of repeated fields (proto2 has no defaults for them); the ancestor's recipe.
REPEATED_DEFAULTS: dict[str, list] = {
    "model.anchors.sizes": [32.0, 64.0, 128.0, 256.0, 512.0],  # one per level P2..P6
    "model.anchors.aspect_ratios": [0.5, 1.0, 2.0],
    "model.anchors.strides": [4, 8, 16, 32, 64],
    "model.roi_heads.bbox_reg_weights": [10.0, 10.0, 5.0, 5.0],
    # ImageNet statistics on the 0-255 scale, as torchvision's detection models use.
    "model.pixel_mean": [123.675, 116.28, 103.53],
    "model.pixel_std": [58.395, 57.12, 57.375],
}
# 800 short side, 1333 long side, rounded up to a multiple of 32 for the FPN strides.
DEFAULT_CANVAS = [(800, 1344), (1344, 800)]


@dataclass(frozen=True)
class Layer:
    """One text-format source of config fields: a file or a --set override."""

    source: str  # what error messages call it: a file path or "--set #i"
    message: config_pb2.Config


def named_configs() -> list[str]:
    """Names accepted by --config, from the .pbtxt files shipped in the package."""
    return sorted(p.stem for p in NAMED_DIR.glob("*.pbtxt"))


def resolve_config_path(name_or_path: str) -> Path:
    """A named config ("shapes", "32x4") or a path to a .pbtxt file."""
    path = Path(name_or_path)
    if path.suffix == ".pbtxt" or len(path.parts) > 1:
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path} does not exist")
        return path
    named = NAMED_DIR / f"{name_or_path}.pbtxt"
    if not named.is_file():
        raise ConfigError(
            f"unknown config {name_or_path!r}: not a file, and not one of the named configs "
            f"{', '.join(named_configs())}"
        )
    return named


def parse_text(text: str, source: str) -> config_pb2.Config:
    """Parses text-format Config; a syntax error, unknown field or wrong type names `source`."""
    config = config_pb2.Config()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        # ParseError text is "line:col : message"; fold it into "source:line:col: message".
        where = f"{error.GetLine()}:{error.GetColumn()}" if error.GetLine() else ""
        detail = str(error).split(" : ", 1)[-1] if where else str(error)
        message = f"{source}:{where}: {detail}" if where else f"{source}: {detail}"
        raise ConfigError(message) from None
    return config


def read_layers(name_or_path: str, _seen: tuple[Path, ...] = ()) -> list[Layer]:
    """The file layers of a config, deepest `base` first."""
    path = resolve_config_path(name_or_path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: base chain loops back to this file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config: {error}") from None
    message = parse_text(text, str(path))
    layers = []
    if message.HasField("base"):
        base = message.base
        # A relative base path is relative to the file that names it.
        if base.endswith(".pbtxt") and not Path(base).is_absolute():
            base = str(path.parent / base)
        layers = read_layers(base, (*_seen, path))
    return [*layers, Layer(str(path), message)]


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf 7 removed `label`; `is_repeated` only exists from 6.x. We support 5.26 to 7.x.
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def merge_replacing(dst: Message, src: Message) -> None:
    """Copies every field set in src onto dst; repeated fields replace instead of appending."""
    for field, value in src.ListFields():
        if _is_repeated(field):
            dst.ClearField(field.name)
            getattr(dst, field.name).extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            merge_replacing(getattr(dst, field.name), value)
        else:
            setattr(dst, field.name, value)


def _field_value(message: Message, path: str):
    """The value at a dotted path, or None where the path is not set in message."""
    *parents, leaf = path.split(".")
    for name in parents:
        if not message.HasField(name):
            return None
        message = getattr(message, name)
    field = message.DESCRIPTOR.fields_by_name[leaf]
    if _is_repeated(field):
        return getattr(message, leaf) or None
    return getattr(message, leaf) if message.HasField(leaf) else None


def _fill_defaults(config: config_pb2.Config) -> None:
    for path, values in REPEATED_DEFAULTS.items():
        *parents, leaf = path.split(".")
        message = config
        for name in parents:
            message = getattr(message, name)
        if not getattr(message, leaf):
            getattr(message, leaf).extend(values)
    if not config.data.canvas:
        for height, width in DEFAULT_CANVAS:
            config.data.canvas.add(height=height, width=width)


def _make_explicit(message: Message) -> None:
    """Marks every scalar field set, so the written config shows the defaults in force."""
    for field in message.DESCRIPTOR.fields:
        if _is_repeated(field):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in getattr(message, field.name):
                    _make_explicit(item)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            _make_explicit(getattr(message, field.name))
        elif field.name != "base":
            setattr(message, field.name, getattr(message, field.name))


def build_config(layers: Sequence[Layer]) -> config_pb2.Config:
    """Merges layers in order, fills defaults and validates.

    A validation error names the field and the last layer that set it (or the first file, if
    the failing value is a default).
    """
    config = config_pb2.Config()
    for layer in layers:
        merge_replacing(config, layer.message)
    config.ClearField("base")
    _fill_defaults(config)
    _make_explicit(config)
    problem = validate(config)
    if problem is not None:
        path, reason, related = problem
        source = next(
            (
                layer.source
                for layer in reversed(layers)
                if any(_field_value(layer.message, p) is not None for p in (path, *related))
            ),
            layers[-1].source if layers else "<defaults>",
        )
        raise ConfigError(f"{source}: {path} {reason}")
    return config


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> config_pb2.Config:
    """The resolved config for --config=name_or_path with --set overrides applied in order."""
    layers = read_layers(name_or_path)
    for index, text in enumerate(overrides, start=1):
        source = f"--set #{index} ({text.strip()!r})"
        layers.append(Layer(source, parse_text(text, source)))
    return build_config(layers)


def to_text(config: config_pb2.Config) -> str:
    return text_format.MessageToString(config)

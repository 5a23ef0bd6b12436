"""Run configuration: the protobuf schema (config.proto), named configs and their loading."""

from maskrcnn.config.config_pb2 import Config, Precision
from maskrcnn.config.errors import ConfigError
from maskrcnn.config.loader import load_config, named_configs, to_text

__all__ = ["Config", "ConfigError", "Precision", "load_config", "named_configs", "to_text"]

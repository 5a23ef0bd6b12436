"""The generated protobuf module matches its .proto and imports on supported runtimes."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _gen_proto_module():
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "tools" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_in_sync_with_proto(tmp_path):
    """If this fails, config.proto was edited without running `python tools/gen_proto.py`,
    and the package would run with a stale schema."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) carries protoc")
    fresh = _gen_proto_module().generate(tmp_path).read_text()
    committed = (REPO / "maskrcnn" / "config" / "config_pb2.py").read_text()
    assert fresh == committed, "run `python tools/gen_proto.py` and commit config_pb2.py"


def test_generated_code_has_no_runtime_version_gate():
    """If this fails, config_pb2.py was made by a protoc whose code refuses protobuf runtimes
    older than itself, so it may not import in the GPU image (see tools/gen_proto.py)."""
    source = (REPO / "maskrcnn" / "config" / "config_pb2.py").read_text()
    assert "Protobuf Python Version: 5.26.1" in source
    assert "ValidateProtobufRuntimeVersion" not in source


def test_generated_code_imports_without_warnings():
    """If this fails, importing the schema warns or fails under this machine's protobuf."""
    import subprocess

    result = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "from maskrcnn.config import config_pb2; print(config_pb2.Config.DESCRIPTOR.name)"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Config"

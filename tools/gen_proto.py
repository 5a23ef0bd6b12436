"""Regenerates maskrcnn/config/config_pb2.py from maskrcnn/config/config.proto.

Run after any schema change: `python tools/gen_proto.py`. It uses the protoc bundled with the
pinned grpcio-tools (requirements.lock), whose generated code ("Protobuf Python Version:
5.26.1") carries no runtime-version check and imports under protobuf 5.26 through 7.x, so the
same file works on this machine (protobuf 5.29) and in the GPU image. tests/config checks that
the committed file is what this script produces.
"""

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO = "maskrcnn/config/config.proto"


def generate(out_dir: Path) -> Path:
    """Writes config_pb2.py under out_dir/maskrcnn/config/ and returns its path."""
    # -I is the repo root so the descriptor is registered as "maskrcnn/config/config.proto",
    # a name that cannot collide with another package's "config.proto" in the global pool.
    status = protoc.main(["protoc", f"-I{REPO}", f"--python_out={out_dir}", str(REPO / PROTO)])
    if status != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {status})")
    return out_dir / "maskrcnn" / "config" / "config_pb2.py"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = generate(Path(tmp)).read_text()
    target = REPO / "maskrcnn" / "config" / "config_pb2.py"
    target.write_text(source)
    print(f"wrote {target.relative_to(REPO)}")


if __name__ == "__main__":
    sys.exit(main())

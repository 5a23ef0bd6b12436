"""Reading TensorBoard event files as TensorBoard does, for tests: TFRecord framing (uint64
length, masked CRC-32C of it, payload, masked CRC-32C of the payload; every CRC checked), each
payload a `tensorflow.Event` decoded with the schema TensorBoard uses (tensorboardX ships the
same event.proto). Written here, independently of the writer, so that a test catches a file
TensorBoard would reject."""

import struct
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: Path) -> list[Event]:
    """Every event of a file; ValueError naming the byte where a CRC does not match."""
    data = Path(path).read_bytes()
    events, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8:pos + 12])[0] != masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        payload = data[pos + 12:pos + 12 + length]
        if struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] != masked_crc(
                payload):
            raise ValueError(f"{path}: bad payload CRC at byte {pos}")
        events.append(Event.FromString(payload))
        pos += 16 + length
    return events


def read_scalars(path: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar summary in an event file."""
    return [(event.step, value.tag, value.simple_value) for event in read_events(path)
            for value in event.summary.value if value.HasField("simple_value")]

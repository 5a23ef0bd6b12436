"""TensorBoard event files, written without TensorBoard installed.

An event file is a sequence of records: uint64 length, masked CRC-32C of the length, the
payload (a serialised `tensorflow.Event` protocol buffer), masked CRC-32C of the payload. We
write the few Event fields scalars need by hand (wall_time = 1, step = 2, file_version = 3,
summary = 5 holding Summary.Value{tag = 1, simple_value = 2}), which keeps TensorBoard (and
the protobuf versions it pins) out of our dependencies. `read_scalars` reads them back.
"""

import socket
import struct
import time
from pathlib import Path


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


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
            for tag, value in scalars.items())
        out += _field(5, summary)
    return out


class EventWriter:
    """Appends scalar summaries to a new event file in a folder."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed in close())
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, payload: bytes) -> None:
        header = struct.pack("<Q", len(payload))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + payload
                         + struct.pack("<I", _masked_crc(payload)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write(_event(time.time(), step, scalars=values))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes):
    """(field number, wire type, value) of a serialised message's fields."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def read_scalars(path: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file; checks every CRC."""
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8:pos + 12])[0] != _masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        payload = data[pos + 12:pos + 12 + length]
        if struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] != _masked_crc(
                payload):
            raise ValueError(f"{path}: bad payload CRC at byte {pos}")
        pos += 16 + length
        step = 0
        for number, _, value in _fields(payload):
            if number == 2:
                step = value
            elif number == 5:
                for _, _, entry in _fields(value):
                    tag, scalar = "", 0.0
                    for n, _, v in _fields(entry):
                        if n == 1:
                            tag = v.decode()
                        elif n == 2:
                            (scalar,) = struct.unpack("<f", v)
                    out.append((step, tag, scalar))
    return out

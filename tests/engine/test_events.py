"""TensorBoard event files written without TensorBoard."""

import pytest

from maskrcnn.engine.events import EventWriter, crc32c, read_scalars


def test_crc32c_check_value():
    """If this fails, TensorBoard rejects every record (CRC-32C, Castagnoli)."""
    assert crc32c(b"123456789") == 0xE3069283


def test_scalars_round_trip(tmp_path):
    writer = EventWriter(tmp_path)
    writer.scalars(3, {"loss/total": 1.5, "lr": 0.02})
    writer.scalars(7, {"loss/total": 0.25})
    writer.close()
    assert "tfevents" in writer.path.name
    assert read_scalars(writer.path) == [(3, "loss/total", 1.5),
                                         (3, "lr", pytest.approx(0.02)), (7, "loss/total", 0.25)]


def test_corruption_is_detected(tmp_path):
    writer = EventWriter(tmp_path)
    writer.scalars(1, {"a": 1.0})
    writer.close()
    data = bytearray(writer.path.read_bytes())
    data[-6] ^= 0xFF
    writer.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        read_scalars(writer.path)

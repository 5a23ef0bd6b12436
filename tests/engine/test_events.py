"""TensorBoard event files (tensorboardX), read back as TensorBoard reads them."""

import pytest

from maskrcnn.engine.events import EventWriter
from tests.engine.event_files import crc32c, read_events, read_scalars


def test_crc32c_check_value():
    """If this fails, the test reader's CRC-32C (Castagnoli) is wrong, so the CRC checks
    below prove nothing."""
    assert crc32c(b"123456789") == 0xE3069283


def test_scalars_round_trip(tmp_path):
    """If this fails, TensorBoard would not show our scalars: a record's framing or CRC is
    off, the file does not start with the version event TensorBoard expects, or a tag, step
    or value is lost."""
    writer = EventWriter(tmp_path)
    writer.scalars(3, {"loss/total": 1.5, "lr": 0.02})
    writer.scalars(7, {"loss/total": 0.25})
    writer.close()
    assert writer.path.name.startswith("events.out.tfevents.")
    assert read_events(writer.path)[0].file_version == "brain.Event:2"
    assert read_scalars(writer.path) == [(3, "loss/total", 1.5),
                                         (3, "lr", pytest.approx(0.02)), (7, "loss/total", 0.25)]


def test_corruption_is_detected(tmp_path):
    """If this fails, the reader accepts a damaged file (so the round trip above could pass on
    one TensorBoard would reject)."""
    writer = EventWriter(tmp_path)
    writer.scalars(1, {"a": 1.0})
    writer.close()
    data = bytearray(writer.path.read_bytes())
    data[-6] ^= 0xFF
    writer.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        read_scalars(writer.path)


def test_two_writers_in_one_second_keep_their_own_files(tmp_path):
    """If this fails, a run resumed within the second its stopped run began (same time stamp,
    same host) cannot name its event file, or writes into the other writer's file."""
    first, second = EventWriter(tmp_path), EventWriter(tmp_path)
    first.scalars(1, {"a": 1.0})
    second.scalars(2, {"a": 2.0})
    first.close()
    second.close()
    assert first.path != second.path
    assert read_scalars(first.path) == [(1, "a", 1.0)]
    assert read_scalars(second.path) == [(2, "a", 2.0)]

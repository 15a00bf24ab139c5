"""Metrics to workdir/metrics.jsonl and TensorBoard event files (process 0 only).

The event file is written here, without a TensorBoard package (tensorboardX imports torch where
it is installed: seconds for every training process): TFRecord framing (length, masked CRC-32C
of the length, the record, its masked CRC-32C) around `Event` protocol buffers, the first naming
the file version, each of the others one step's scalars as `Summary.Value`s (tag, simple_value).
"""
from __future__ import annotations

import json
import pathlib
import socket
import struct
import time


def _crc32c_table() -> list:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Castagnoli), rotated right by 15 bits plus 0xa282ead8."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protocol buffer field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(wall_time: float, step: int = 0, scalars: dict | None = None, file_version: str | None = None) -> bytes:
    """One serialized `Event`: wall_time (1, double), step (2, int64), file_version (3) or a
    summary (5) of scalar values (each a Value: tag (1), simple_value (2, float))."""
    event = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step & 0xFFFFFFFFFFFFFFFF)
    if file_version is not None:
        return event + _field(3, file_version.encode())
    values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                      for tag, value in (scalars or {}).items())
    return event + _field(5, values)


def record_bytes(data: bytes) -> bytes:
    """`data` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class EventFile:
    """A TensorBoard event file in `directory` (events.out.tfevents.TIME.HOST), scalars appended."""

    def __init__(self, directory):
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = directory / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        self.file = open(self.path, "ab")
        self.file.write(record_bytes(event_bytes(now, file_version="brain.Event:2")))
        self.file.flush()

    def add_scalars(self, step: int, scalars: dict) -> None:
        self.file.write(record_bytes(event_bytes(time.time(), step, {k: float(v) for k, v in scalars.items()})))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class MetricWriter:
    def __init__(self, workdir, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.tb = EventFile(pathlib.Path(workdir) / "tensorboard")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tb.add_scalars(int(step), metrics)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

"""A directory of numbered shards that a batch job writes and a restarted job trusts only after
checking: `DIR/samples_{first:08d}_{last:08d}.npz` (items first..last, inclusive; the prefix and
the suffix are the job's), each written under a temporary name and renamed, then recorded in
`DIR/samples_{first:08d}_{last:08d}.json` (byte size, sha256 and what the job adds). A shard
whose record is missing or does not match is made again.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pathlib
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


def shard_ranges(num_items: int, shard_size: int) -> list[tuple[int, int]]:
    """[(first, last)] inclusive ranges covering 0..num_items-1, `shard_size` items each."""
    return [(a, min(a + shard_size, num_items) - 1) for a in range(0, num_items, shard_size)]


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path, data: bytes) -> None:
    """Writes `data` to `path` under a temporary name in the same directory, then renames it into
    place: a reader sees the old file or the whole new one, never a part."""
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class ShardDir:
    """The shards of one job in `directory` (created if needed)."""

    def __init__(self, directory, prefix: str = "samples", suffix: str = ".npz"):
        self.directory = pathlib.Path(directory)
        self.prefix, self.suffix = prefix, suffix
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, first: int, last: int) -> pathlib.Path:
        return self.directory / f"{self.prefix}_{first:08d}_{last:08d}{self.suffix}"

    def record_path(self, first: int, last: int) -> pathlib.Path:
        return self.directory / f"{self.prefix}_{first:08d}_{last:08d}.json"

    def write(self, first: int, last: int, **arrays) -> dict:
        """Writes the arrays as an .npz shard atomically (temporary file, fsync, rename), then its record."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return self.write_file(first, last, lambda path: path.write_bytes(buffer.getvalue()))

    def write_file(self, first: int, last: int, fill: Callable[[pathlib.Path], None], **extra) -> dict:
        """fill(path) writes the shard's file under a temporary name; it is synced and renamed into
        place, then recorded (size, sha256 and `extra`, JSON values)."""
        path = self.path(first, last)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fill(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        record = {"first": first, "last": last, "bytes": temporary.stat().st_size,
                  "sha256": sha256_file(temporary), **extra}
        os.replace(temporary, path)
        record_tmp = self.record_path(first, last).with_suffix(".json.tmp")
        record_tmp.write_text(json.dumps(record))
        os.replace(record_tmp, self.record_path(first, last))
        return record

    def verified(self, first: int, last: int) -> dict | None:
        """The shard's record if the shard on disk matches it (size, then sha256), else None;
        a shard that exists but does not match is reported."""
        path, record_path = self.path(first, last), self.record_path(first, last)
        if not path.exists():
            return None
        try:
            record = json.loads(record_path.read_text())
            if path.stat().st_size == record["bytes"] and sha256_file(path) == record["sha256"]:
                return record
            reason = "its size or checksum does not match its record"
        except (OSError, ValueError, KeyError):
            reason = "it has no readable record"
        log.warning("shard %s is incomplete or damaged (%s): making it again", path.name, reason)
        return None

    def load(self, first: int, last: int) -> dict:
        with np.load(self.path(first, last)) as data:
            return {k: data[k] for k in data.files}

    def complete(self) -> list[tuple[int, int]]:
        """(first, last) of every shard file present, in order."""
        found = []
        for p in self.directory.glob(f"{self.prefix}_*_*{self.suffix}"):
            parts = p.stem.split("_")
            found.append((int(parts[-2]), int(parts[-1])))
        return sorted(found)

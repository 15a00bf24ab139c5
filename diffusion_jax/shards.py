"""A directory of numbered shards that a batch job writes and a restarted job trusts only after
checking: `DIR/samples_{first:08d}_{last:08d}.npz` (items first..last, inclusive; the prefix and
the suffix are the job's), each written under a temporary name and renamed, then recorded in
`DIR/samples_{first:08d}_{last:08d}.json` (byte size, sha256 and what the job adds). A shard
whose record is missing or does not match is made again.
"""
from __future__ import annotations

import io
import json
import logging
import os
import pathlib
from typing import Callable

import numpy as np

from diffusion_jax.files import remove_leftover_temporaries, sha256_file, temporary_name, write_json_atomically

log = logging.getLogger(__name__)


def shard_ranges(num_items: int, shard_size: int) -> list[tuple[int, int]]:
    """[(first, last)] inclusive ranges covering 0..num_items-1, `shard_size` items each."""
    return [(a, min(a + shard_size, num_items) - 1) for a in range(0, num_items, shard_size)]


class ShardDir:
    """The shards of one job in `directory` (created if needed, unless `create` is False: then it
    must exist). `job`, when given, is the job's identity (a digest of its settings): every
    record written carries it, and a shard whose record names another job does not verify."""

    def __init__(self, directory, prefix: str = "samples", suffix: str = ".npz", create: bool = True,
                 job: str | None = None):
        self.directory = pathlib.Path(directory)
        self.prefix, self.suffix, self.job = prefix, suffix, job
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not self.directory.is_dir():
            raise FileNotFoundError(f"no directory {self.directory}")

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
        place, then recorded (size, sha256, the job and `extra`, JSON values). Temporary files of
        this shard left by a process that died are removed first, with a message."""
        path = self.path(first, last)
        for left in remove_leftover_temporaries(path):
            log.warning("removed %s, left by an interrupted process", left.name)
        temporary = temporary_name(path)
        fill(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        record = {"first": first, "last": last, "bytes": temporary.stat().st_size,
                  "sha256": sha256_file(temporary), **({"job": self.job} if self.job else {}), **extra}
        os.replace(temporary, path)
        write_json_atomically(self.record_path(first, last), record)
        return record

    def inspect(self, first: int, last: int) -> tuple[dict | None, str]:
        """(the shard's record, "") if the shard on disk matches it (size, then sha256, and the
        job), else (None, why not)."""
        path, record_path = self.path(first, last), self.record_path(first, last)
        if not path.exists():
            return None, "it is missing"
        try:
            record = json.loads(record_path.read_text())
            if path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
                return None, "its size or checksum does not match its record"
        except (OSError, ValueError, KeyError, TypeError):
            return None, "it has no readable record"
        if self.job is not None and record.get("job") != self.job:
            return None, "its record names another job"
        return record, ""

    def verified(self, first: int, last: int) -> dict | None:
        """The shard's record if the shard verifies (`inspect`), else None; a shard that exists but
        does not verify is reported (the caller makes it again)."""
        record, why = self.inspect(first, last)
        if record is None and self.path(first, last).exists():
            log.warning("shard %s is incomplete or damaged (%s): making it again", self.path(first, last).name, why)
        return record

    def load(self, first: int, last: int) -> dict:
        with np.load(self.path(first, last)) as data:
            return {k: data[k] for k in data.files}

    def complete(self) -> list[tuple[int, int]]:
        """(first, last) of every shard file present, in order."""
        found = []
        for p in self.directory.glob(f"{self.prefix}_*_*{self.suffix}"):
            parts = p.stem.split("_")
            if len(parts) >= 3 and parts[-2].isdigit() and parts[-1].isdigit():
                found.append((int(parts[-2]), int(parts[-1])))
        return sorted(found)

    def records(self) -> list[dict]:
        """The readable records in the directory (whatever job wrote them)."""
        found = []
        for p in sorted(self.directory.glob(f"{self.prefix}_*_*.json")):
            try:
                found.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return found

"""A training run's workdir: checked writable, held by one trainer at a time (a lock file with
its host, pid and start time), and its config.json written only once a resume is known to be
valid, with the config it replaces kept beside it.

The lock is taken atomically (O_CREAT | O_EXCL). A lock left by a trainer that died (kill -9,
a lost host) is taken over with a message: on the same host when its pid is gone, from another
host when its heartbeat (the file's mtime, touched every 30 s) is older than 5 minutes.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import threading
import time
import uuid

from diffusion_jax.errors import WorkdirLocked
from diffusion_jax.files import differences, ensure_writable_dir, pid_alive, write_atomically

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


def check_workdir(workdir) -> pathlib.Path:
    """Creates `workdir` and checks it is writable, with a probe file of the caller's own (the
    processes of a multi-host run check the shared directory at the same moment)."""
    return ensure_writable_dir(workdir, "--workdir")


class WorkdirLock:
    """`with WorkdirLock(workdir):` -- this trainer alone writes the workdir meanwhile."""

    def __init__(self, workdir):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                     "started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        self._stop = threading.Event()
        self._thread = None

    def holder(self) -> dict | None:
        """The lock file's contents (plus its age in seconds), or None when there is none."""
        try:
            text, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:  # being written, or garbled: judged by its heartbeat alone
            holder = {"host": "?", "pid": -1, "started_utc": "?"}
        return {**holder, "age": age}

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == self.info["host"] and holder.get("pid", -1) > 0:
            return not pid_alive(int(holder["pid"]))
        return holder["age"] > STALE_SECONDS

    def acquire(self) -> None:
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile
                if not self._stale(holder):
                    raise WorkdirLocked(
                        f"workdir {str(self.path.parent)!r} is in use by another trainer (pid {holder.get('pid')} "
                        f"on {holder.get('host')}, started {holder.get('started_utc')}): wait for it to finish, "
                        f"or stop it; if that trainer is dead, remove {self.path}")
                try:  # only one of several takers wins this rename
                    os.rename(self.path, self.path.with_name(f"{LOCK_NAME}.stale.{uuid.uuid4().hex[:8]}"))
                except FileNotFoundError:
                    continue
                log.warning("took over the lock of a trainer that is gone (pid %s on %s, started %s)",
                            holder.get("pid"), holder.get("host"), holder.get("started_utc"))
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            self._thread = threading.Thread(target=self._heartbeat, daemon=True)
            self._thread.start()
            return
        raise WorkdirLocked(f"could not take the lock {self.path}: other trainers keep taking it")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        holder = self.holder()
        if holder and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def write_config(workdir, config, resumed_step: int | None) -> list[str]:
    """Writes workdir/config.json (atomically) and returns how it differs from the one there.

    A changed config is kept first as config.<step>.json: the settings that trained the run up
    to `resumed_step` (0 for a fresh start over an old config.json).
    """
    workdir = pathlib.Path(workdir)
    path = workdir / "config.json"
    changes = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        from diffusion_jax.config import migrate_config  # a renamed setting is not a change

        changes = differences(migrate_config(old) if isinstance(old, dict) else {}, config.to_dict())
        kept = workdir / f"config.{resumed_step or 0}.json"
        if changes and not kept.exists():
            kept.write_text(path.read_text())
    write_atomically(path, config.to_json(indent=2).encode())
    return changes

"""Small decisions about files, each made once: an atomic write, a file's sha256, a JSON file
read with its name in any error, a directory claimed by one job's settings, and a writable
place checked before any work is done."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import uuid

from diffusion_jax.errors import UsageError


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temporary_name(path) -> pathlib.Path:
    """A name beside `path` that no other process uses (its pid and a random part): the place a
    file is written before it is renamed into place; `temporaries_of` finds them."""
    path = pathlib.Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def temporaries_of(path) -> list[pathlib.Path]:
    """The temporary files (`temporary_name`) of `path` in its directory, left or in use."""
    path = pathlib.Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_leftover_temporaries(path) -> list[pathlib.Path]:
    """Removes the temporary files of `path` left by processes of this host that are gone
    (kill -9 mid-write); returns them. A temporary of a live process is left alone."""
    removed = []
    for temporary in temporaries_of(path):
        parts = temporary.name[len(f".{pathlib.Path(path).name}."):].split(".")
        if parts and parts[0].isdigit() and not pid_alive(int(parts[0])):
            temporary.unlink(missing_ok=True)
            removed.append(temporary)
    return removed


def write_atomically(path, data: bytes) -> None:
    """Writes `data` to `path` under a temporary name in the same directory, then renames it into
    place: a reader sees the old file or the whole new one, never a part."""
    temporary = temporary_name(path)
    temporary.write_bytes(data)
    os.replace(temporary, path)


def write_json_atomically(path, value) -> None:
    write_atomically(path, (json.dumps(value, indent=1) + "\n").encode())


def read_text(path, what: str) -> str:
    """A UTF-8 text file as editors write it: a byte-order mark dropped, CRLF or CR line ends read as
    LF; a file that is not UTF-8 is a UsageError naming it and `what` it should be."""
    path = pathlib.Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): save {what} as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_json(path, fix: str):
    """The JSON value in `path`; an unreadable or invalid file is a ValueError that names the file,
    what is wrong, and `fix` (what the user should do)."""
    path = pathlib.Path(path)
    text = read_text(path, f"it ({fix})")
    if not text.strip():
        raise UsageError(f"{path} is empty: {fix}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} is not valid JSON ({error}): {fix}") from None


def read_json_object(path, fix: str) -> dict:
    """`read_json`, which must give a JSON object (a dict)."""
    value = read_json(path, fix)
    if not isinstance(value, dict):
        raise UsageError(f"{path} holds a JSON {type(value).__name__}, not an object: {fix}")
    return value


def differences(old, new, prefix: str = "") -> list[str]:
    """["key.path was A, now B", ...] for every leaf where two nested dicts (or ConfigDicts)
    differ; lists and tuples alike (a dict read back from JSON has lists)."""
    as_dict = lambda d: d.to_dict() if hasattr(d, "to_dict") else dict(d)
    same = lambda v: [same(x) for x in v] if isinstance(v, (list, tuple)) else v
    old, new = as_dict(old), as_dict(new)
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += differences(a, b, f"{prefix}{key}.")
        elif same(a) != same(b):
            changes.append(f"{prefix}{key} was {a!r}, now {b!r}")
    return changes


def claim_directory(path, settings: dict, what: str, write: bool = True) -> None:
    """Claims a directory for one job by the JSON file `path` holding its `settings`: writes it
    (atomically, when `write`: the process that writes), or checks that the one there holds the
    same settings. `what` names the job's directory in the refusal ('a generate job')."""
    path = pathlib.Path(path)
    if path.exists():
        old = read_json_object(path, f"delete {path.name} only if the directory's other files are "
                                     "yours to lose, or choose another directory")
        changed = differences(old, settings)
        if changed:
            raise UsageError(f"{path.parent} holds {what} with other settings ({'; '.join(changed)}): give the "
                             "same arguments to resume it, or choose another directory")
    elif write:
        write_json_atomically(path, settings)


def ensure_writable_dir(path, flag: str) -> pathlib.Path:
    """Creates `path` and checks a file can be written there, before any work is done; the error
    names the `flag` that chose the place."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag}: cannot write to {str(path)!r}: it is a file, not a directory; choose a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(path / "write_test")
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{flag}: cannot write to {str(path)!r} ({e.strerror}): choose another place") from None
    return path


def ensure_new_dir(path, flag: str) -> pathlib.Path:
    """`ensure_writable_dir` for a directory that must be new or empty: a command that writes a
    whole directory (an export) never mixes its files with others or overwrites them."""
    path = pathlib.Path(path)
    if path.is_dir() and any(path.iterdir()):
        held = sorted(p.name for p in path.iterdir())
        raise UsageError(f"{flag}: {str(path)!r} already holds files ({', '.join(held[:4])}"
                         f"{', ...' if len(held) > 4 else ''}): choose a new or empty directory (delete this one "
                         "first to replace what is there)")
    return ensure_writable_dir(path, flag)

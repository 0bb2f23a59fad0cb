"""What makes a results folder trustworthy: content fingerprints, a lock, the stored configuration, the records.

A resume must prove it continues the same experiment: config.json records the protocol and options, the model's
and baseline's fingerprints, the dtype and the dataset's identity, and every record is matched to its image by
id. The folder is locked while a run writes (one writer at a time; the lock dies with its process), and the
configuration is written together with the first record, so a start that fails never blocks the fixed command.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:                        # Windows: no advisory locks; the folder is not locked there
    fcntl = None


class EvalError(ValueError):
    """Bad input or a results folder that cannot be resumed; the message says what is wrong and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints: cheap content hashes of model folders and dataset files

FULL_HASH_LIMIT = 64 << 20              # files up to 64 MiB are hashed whole
SAMPLE_COUNT, SAMPLE_SIZE = 64, 64 << 10   # larger ones: the first MiB (headers), the size and 64 spread chunks
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".json", ".model", ".txt", ".bin", ".pt", ".pth", ".ckpt")


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or for a large one of its size, first MiB and 64 evenly spread 64 KiB chunks: a few MB
    read even for a 24 GB checkpoint, and any retrained or re-quantised tensor changes it."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as file:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest()
        digest.update(str(size).encode())
        digest.update(file.read(1 << 20))
        for k in range(SAMPLE_COUNT):
            file.seek((size - SAMPLE_SIZE) * k // (SAMPLE_COUNT - 1))
            digest.update(file.read(SAMPLE_SIZE))
    return digest.hexdigest()


def weights_fingerprint(path: str | Path | None) -> str | None:
    """The identity of a model folder (every weight, config and tokenizer file under it, by relative path) or
    file; notes and pictures (README.md, *.png) do not count."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise EvalError(f"model folder {path} not found: check --weights / --baseline-weights")
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()


def listing_digest(items) -> str:
    """sha256 of an iterable of strings (file names, ids), one per line."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The lock: one writer per results folder


class FolderLock:
    """An exclusive advisory lock on OUT/.lock (flock: released by the kernel when the holder dies, kill -9
    included). The file names the holder (pid, host, start time, command) for the refusal message."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self._file = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        file = open(self.path, "a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise EvalError(f"{self.path.parent} is in use by another eval run ({holder}); wait for it to finish, "
                            "or pass another --out") from None
        file.truncate(0)
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------------------------------
# The stored configuration

CONFIG_NAME = "config.json"
RECORD_FILES = "results.rank*.jsonl"
_RESET = "use another --out, or --overwrite to start again"


def read_config(out_dir: Path) -> dict | None:
    """config.json of a results folder, None when there is none; damaged files are one clear error."""
    path = Path(out_dir) / CONFIG_NAME
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvalError(f"{path} is not valid JSON ({error}): the folder's configuration is damaged; "
                        f"{_RESET}") from None
    if not isinstance(stored, dict) or not {"dataset", "protocol", "methods"} <= set(stored):
        raise EvalError(f"{path} is not an eval configuration (no dataset/protocol/methods); {_RESET}")
    return stored


def write_config(out_dir: Path, config: dict) -> None:
    """Atomic (a temporary file renamed into place): ranks may race to write the same content."""
    path = Path(out_dir) / CONFIG_NAME
    temporary = path.with_name(f".{CONFIG_NAME}.{os.getpid()}")
    temporary.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(temporary, path)


def differences(stored: dict, wanted: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(name, stored value, wanted value) for everything that differs; protocol fields go by their own names
    (seed, t, ...), other nested values as parent.child (data.seed, sources.weights)."""
    changed = []
    for key in sorted(set(stored) | set(wanted), key=lambda k: (k != "protocol", k)):
        old, new = stored.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += differences(old, new, "" if key == "protocol" else f"{prefix}{key}.")
        elif old != new:
            changed.append((f"{prefix}{key}", old, new))
    return changed


def describe(changed: list[tuple[str, object, object]]) -> str:
    """'name (stored -> now)' for each difference; content hashes shortened to 12 digits."""
    short = lambda v: v[:12] if isinstance(v, str) and len(v) == 64 else v
    return ", ".join(f"{name} ({short(old)!r} -> {short(new)!r})" for name, old, new in changed)


# ---------------------------------------------------------------------------------------------------------------
# Records: one JSON line per finished image, matched by image id


def _read_records(path: Path) -> list[tuple[str | None, str]]:
    """(image id, line) per line of one results file; id None for a line cut short by an interruption."""
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            rows.append((None, line))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("image_id"), str) or not isinstance(
                record.get("scores"), dict):
            raise EvalError(f"{path} line {number} is not an eval record (needs 'image_id' and 'scores'): "
                            f"delete that line to keep the other results, or {_RESET}")
        rows.append((record["image_id"], line))
    return rows


def load_records(out_dir: str | Path) -> dict[str, dict]:
    """Every finished image of every rank's file by image id (the first record of an id wins). A line cut short
    by an interruption is skipped; a whole line that is not a record is an error naming the file and line."""
    records: dict[str, dict] = {}
    for path in sorted(Path(out_dir).glob(RECORD_FILES)):
        for image_id, line in _read_records(path):
            if image_id is not None and image_id not in records:
                records[image_id] = json.loads(line)
    return records


def compact_records(out_dir: str | Path) -> int:
    """Rewrite the results files without repeated images and cut-short lines (left by two runs on one folder
    before folders were locked, or by kills); returns the number of lines dropped. Only under the lock."""
    seen: set[str] = set()
    dropped = 0
    for path in sorted(Path(out_dir).glob(RECORD_FILES)):
        rows, keep = _read_records(path), []
        for image_id, line in rows:
            if image_id is None or image_id in seen:
                dropped += 1
            else:
                seen.add(image_id)
                keep.append(line)
        if len(keep) != len(rows):
            temporary = path.with_name(f".{path.name}.{os.getpid()}")
            temporary.write_text("".join(line + "\n" for line in keep))
            os.replace(temporary, path)
    return dropped


def results_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"results.rank{rank}.jsonl"


class ResultsFile:
    """This rank's results file, opened on the first record: config.json is written just before it, so a run
    that fails before finishing one image leaves nothing behind that could refuse the next command. (Lines cut
    short by a kill are gone: rank 0 compacts the files before any rank appends.)"""

    def __init__(self, out_dir: Path, rank: int, config: dict):
        self.out_dir, self.path, self.config = Path(out_dir), results_path(out_dir, rank), config
        self._file = None

    def append(self, record: dict) -> None:
        if self._file is None:
            if read_config(self.out_dir) is None:
                write_config(self.out_dir, self.config)
            self._file = open(self.path, "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

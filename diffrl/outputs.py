"""Where a command writes (``--out``), checked before any model loads or any sample is scored: a path that cannot
be written is one line at once, not a traceback after minutes of work, and a folder holding an earlier
command's output is refused (or, for a command's own default folder, cleared) rather than mixed with it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from diffrl.errors import DiffrlError


def _probe(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".diffrl-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DiffrlError(f"{what} cannot be written ({e.strerror or e}); choose a writable place") from None


def writable_file(path: str | Path, *, option: str = "--out") -> Path:
    """``path`` as a file this process can create (its folder is made if missing)."""
    path = Path(path)
    if path.is_dir():
        raise DiffrlError(f"{option} {path} is a folder; give a file name (.jsonl or .csv)")
    _probe(path.parent, f"{option} {path}")
    return path


def fresh_folder(path: str | Path, earlier: tuple[str, ...], *, default: bool, option: str = "--out") -> Path:
    """``path`` as a writable folder without ``earlier`` outputs in it: a folder the user named that holds them is
    refused; the command's own default folder is cleared of them."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DiffrlError(f"{option} {path} is a file; give a folder")
    found = [name for name in earlier if (path / name).exists()]
    if found and not default:
        raise DiffrlError(f"{option} {path} already holds {', '.join(found)} of an earlier run of this command; "
                          f"choose a new {option} folder, or remove them")
    _probe(path, f"{option} {path}")
    for name in found:
        target = path / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return path

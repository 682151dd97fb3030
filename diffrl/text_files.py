"""One way in for every text file a user hands diffrl: prompt files, jsonl / json tables and configs."""

from __future__ import annotations

import codecs
from pathlib import Path

from diffrl.errors import DataError


def read_text(path: str | Path, *, error: type[Exception] = DataError) -> str:
    """The file as UTF-8 text with a leading byte-order mark dropped (editors on Windows write one); NUL bytes
    (a UTF-16 or binary file) and bytes that are not UTF-8 are one ``error`` line naming the file and the fix."""
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise error(f"{path}: holds NUL bytes (first at byte {nul}): not UTF-8 text (a UTF-16 or binary file?); "
                    f"save it as UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None

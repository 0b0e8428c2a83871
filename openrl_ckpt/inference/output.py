"""Output files of batch inference, written atomically: the next stage of a loop trains on whatever
file it finds, so a crash must leave either the whole file or none (never half of one)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from openrl_ckpt.errors import UserError
from openrl_ckpt.utils.atomic import stale_temp_siblings, temp_sibling, write_file_atomic


def check_output_path(path: str) -> None:
    """Fail before hours of generation, not after: the folder exists (or can be made) and takes files.
    Temp files that an interrupted earlier job left beside ``path`` are removed (one job per output file)."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--output_path {path} is a directory; give a file name (e.g. {target / 'out.jsonl'})")
    probe = temp_sibling(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in stale_temp_siblings(target):
            stale.unlink(missing_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output_path {path}: cannot write there ({e.strerror or e})") from None


def write_jsonl_atomic(path: str, rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` as JSON lines over ``path`` atomically; returns the number of rows. On failure
    the previous ``path`` (if any) is left as it was, and no temp file stays behind."""
    count = 0

    def write_rows(f: IO[str]) -> None:
        nonlocal count
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1

    try:
        write_file_atomic(Path(path), write_rows)
    except OSError as e:
        raise UserError(f"--output_path {path}: cannot write the output ({e.strerror or e})") from None
    return count

"""Output files of batch inference, written atomically: the next stage of a loop trains on whatever
file it finds, so a crash must leave either the whole file or none (never half of one)."""

from __future__ import annotations

import glob
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

from openrl_ckpt.errors import UserError


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")


def check_output_path(path: str) -> None:
    """Fail before hours of generation, not after: the folder exists (or can be made) and takes files.
    Temp files that an interrupted earlier job left beside ``path`` are removed (one job per output file)."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--output_path {path} is a directory; give a file name (e.g. {target / 'out.jsonl'})")
    probe = _tmp_name(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
            stale.unlink(missing_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output_path {path}: cannot write there ({e.strerror or e})") from None


def write_jsonl_atomic(path: str, rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` as JSON lines to a temp file beside ``path``, fsync it, rename it over ``path``
    and fsync the folder. Returns the number of rows. On failure the temp file is removed and the
    previous ``path`` (if any) is left as it was."""
    target = Path(path)
    tmp = _tmp_name(target)
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f"--output_path {path}: cannot write the output ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename
    return n

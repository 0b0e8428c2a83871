"""DeepSpeed's universal checkpoint format: the bridge for a resume on another world size or ZeRO stage.

A ZeRO checkpoint stores the optimizer state in one partition per rank, so it only loads on the
same number of ranks with the same stage. The universal form stores every parameter's fp32 weight
and optimizer moments whole (``zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt``), which DeepSpeed
re-partitions at load time for any world size or stage (``checkpoint.load_universal``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from argparse import Namespace
from pathlib import Path

from openrl_ckpt.utils.atomic import fsync_dir, fsync_tree, write_file_atomic

LATEST_UNIVERSAL = "latest_universal"  # the tag DeepSpeed loads when load_checkpoint gets none


def needs_universal(engine_dir: Path) -> bool:
    """Whether an engine checkpoint holds partitioned optimizer state (ZeRO, or DeepSpeed's bf16
    optimizer), i.e. cannot load on another world size or stage without conversion."""
    return any(engine_dir.glob("*optim_states.pt"))


def convert_to_universal(checkpoint_dir: Path, tag: str, output_dir: Path) -> None:
    """Write the universal form of the engine checkpoint ``checkpoint_dir/tag`` to ``output_dir/tag``.

    The result appears atomically (built in ``output_dir/.tmp-<tag>``, fsynced, renamed), replacing an
    older conversion, and ``output_dir/latest_universal`` names it, so that
    ``engine.load_checkpoint(output_dir, tag=tag)`` with ``checkpoint.load_universal`` enabled loads it
    on any number of ranks. Runs in one process (the conversion reads every rank's files); raises
    ``ValueError`` when ``checkpoint_dir/tag`` is not a DeepSpeed ZeRO checkpoint, ``OSError`` on I/O errors.
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    source = checkpoint_dir / tag
    if not needs_universal(source):
        raise ValueError(f"{source} holds no ZeRO optimizer partitions (*optim_states.pt)")
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / tag
    tmp = output_dir / f".tmp-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    # One worker: the conversion runs inside a training rank, where forking a process pool is unsafe.
    args = Namespace(input_folder=str(source), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    progress = io.StringIO()
    try:
        with contextlib.redirect_stdout(progress), contextlib.redirect_stderr(progress):
            ds_to_universal(args)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(output_dir)
    write_file_atomic(output_dir / LATEST_UNIVERSAL, tag)  # the converter wrote the temp name there

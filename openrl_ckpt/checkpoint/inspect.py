"""Reading committed checkpoints without a process group: find, describe, verify and prune them.

Used by ``python -m openrl_ckpt.cli.ckpt``. Discovery, verification and rotation are the manager's
own functions, so the tool applies exactly the rules a training run applies. Nothing here deletes
anything except ``prune``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openrl_ckpt.checkpoint.commit import rotate_checkpoints
from openrl_ckpt.checkpoint.files import (
    HASH_ALGO,
    MANIFEST,
    STEP_DIR,
    CheckpointError,
    check_files,
    check_sizes,
    committed_steps,
    dir_size,
    plan_rotation,
    read_manifest,
    step_dir_name,
)
from openrl_ckpt.checkpoint.state import STATE_FILE, TrainState
from openrl_ckpt.errors import UserError

HF_DIR = "hf"  # <step>/hf/<engine>/: config, tokenizer (and adapter config); the weights with --save_hf_ckpt
BEST_KEY = "best"  # manifest meta and train state extra: {"step", "metric", "mode", "value"}
EVAL_KEY = "eval"  # manifest meta: {metric: value} of the evaluation run at this checkpoint's step


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    size: int
    created_unix: float | None
    epoch: int | None
    consumed_samples: int | None
    engines: list[str]
    hf_copy: bool  # a Hugging Face copy with weights (--save_hf_ckpt / --disable_ds_ckpt)
    problems: list[str] = field(default_factory=list)
    best: bool = False

    @property
    def valid(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "path": str(self.path), "size_bytes": self.size, "created_unix": self.created_unix,
                "epoch": self.epoch, "consumed_samples": self.consumed_samples, "engines": self.engines,
                "hf_copy": self.hf_copy, "valid": self.valid, "problems": self.problems, "best": self.best}


def resolve(path: str, step: int | None = None) -> tuple[Path, int | None]:
    """The checkpoint folder and the step asked for; a ``global_step<N>`` path stands for its parent and N."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such directory")
    if not p.is_dir():
        raise UserError(f"{path}: not a directory")
    m = STEP_DIR.match(p.resolve().name)
    if m:
        if step is not None and step != int(m.group(1)):
            raise UserError(f"{path} is step {m.group(1)} but --step {step} was given")
        return p.resolve().parent, int(m.group(1))
    return p, step


def uncommitted_step_dirs(root: Path) -> list[Path]:
    """``global_step<N>`` folders without a manifest: not checkpoints (a lost manifest or a foreign folder)."""
    return sorted((c for c in root.iterdir() if STEP_DIR.match(c.name) and c.is_dir() and not (c / MANIFEST).exists()),
                  key=lambda c: int(c.name.removeprefix("global_step")))


def require_committed(root: Path) -> list[int]:
    """Committed steps, newest first; a clear error when the folder holds none."""
    steps = committed_steps(root)
    if steps:
        return steps
    loose = uncommitted_step_dirs(root)
    if loose:
        raise UserError(f"{root}: no committed checkpoint ({', '.join(c.name for c in loose)} "
                        f"{'has' if len(loose) == 1 else 'have'} no {MANIFEST})")
    raise UserError(f"{root}: not a checkpoint folder (no global_step<N>/ holding a {MANIFEST})")


def step_path(root: Path, step: int) -> Path:
    """A committed checkpoint's folder, or a clear error naming what is wrong with it."""
    path = root / step_dir_name(step)
    if not path.is_dir():
        have = committed_steps(root)
        raise UserError(f"{path}: no such checkpoint (committed steps: {', '.join(map(str, have)) or 'none'})")
    if not (path / MANIFEST).exists():
        raise UserError(f"{path}: no {MANIFEST}, so it is not a committed checkpoint (resume ignores it)")
    return path


def verify(path: Path, quick: bool = False) -> list[str]:
    """Problems of one checkpoint folder against its manifest (missing, size, checksum); [] when valid.

    ``quick`` checks presence and sizes only (no re-hash). The train state must also parse, as resume needs it.
    """
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        return [str(e)]
    files = manifest["files"]
    if quick:
        problems = check_sizes(path, files)
    else:
        if manifest.get("hash", HASH_ALGO) != HASH_ALGO:
            return [f"{path}/{MANIFEST}: unknown hash {manifest.get('hash')!r}"]
        problems = check_files(path, files, sorted(files))
    if STATE_FILE in files and not any(p.startswith(f"{STATE_FILE}:") for p in problems):
        try:
            TrainState.from_json((path / STATE_FILE).read_text())
        except (OSError, ValueError, TypeError) as e:
            problems.append(f"{STATE_FILE}: unreadable ({e})")
    return problems


def engines_of(path: Path) -> list[str]:
    """Engine tags in a checkpoint: DeepSpeed engine folders, else Hugging Face copies under hf/."""
    tags = sorted(c.name for c in path.iterdir() if c.is_dir() and any(c.glob("*model_states.pt")))
    if tags:
        return tags
    hf = path / HF_DIR
    return sorted(c.name for c in hf.iterdir() if c.is_dir()) if hf.is_dir() else []


def has_hf_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def describe(root: Path, step: int, quick: bool = False, check: bool = True) -> CheckpointInfo:
    path = root / step_dir_name(step)
    meta: dict[str, Any] = {}
    size, created = 0, None
    try:
        manifest = read_manifest(path)
        meta = manifest.get("meta") or {}
        size = int(manifest.get("total_bytes") or 0)
        created = manifest.get("created_unix")
    except CheckpointError:
        pass
    engines = engines_of(path) if path.is_dir() else []
    return CheckpointInfo(step=step, path=path, size=size, created_unix=created, epoch=meta.get("epoch"),
                          consumed_samples=meta.get("consumed_samples"), engines=engines,
                          hf_copy=any(has_hf_weights(path / HF_DIR / e) for e in engines),
                          problems=verify(path, quick) if check else [])


def _meta(root: Path, step: int) -> dict[str, Any]:
    try:
        return read_manifest(root / step_dir_name(step)).get("meta") or {}
    except CheckpointError:
        return {}


def best_checkpoint(root: Path, metric: str, mode: str) -> tuple[int, float] | None:
    """(step, value) of the committed checkpoint whose own evaluation (``meta.eval``, recorded when the
    run evaluated at that step) is best; None when none was evaluated. Read from the manifests on disk,
    so a resumed run, a failed save and ``ckpt prune`` all see the same best."""
    scored = []
    for step in committed_steps(root):
        value = (_meta(root, step).get(EVAL_KEY) or {}).get(metric)
        if isinstance(value, (int, float)):
            scored.append((float(value), step))
    if not scored:
        return None
    value, step = min(scored, key=lambda vs: (vs[0] if mode == "min" else -vs[0], vs[1]))  # ties: the earliest
    return step, value


def best_step(root: Path, steps: list[int]) -> int | None:
    """The best checkpoint under the rule the run recorded (--save_best_metric/--save_best_mode in the
    newest manifest that names one)."""
    for step in steps:  # newest first
        spec = _meta(root, step).get(BEST_KEY)
        if isinstance(spec, dict) and spec.get("metric") and spec.get("mode") in ("min", "max"):
            best = best_checkpoint(root, spec["metric"], spec["mode"])
            return best[0] if best else None
    return None


def list_checkpoints(root: Path, quick: bool = False) -> list[CheckpointInfo]:
    """Every committed checkpoint, oldest first, verified; the best one marked."""
    steps = require_committed(root)
    best = best_step(root, steps)
    infos = [describe(root, s, quick) for s in sorted(steps)]
    for info in infos:
        info.best = info.step == best
    return infos


@dataclass
class PrunePlan:
    delete: list[int]
    keep: list[int]
    pinned: list[int]
    notes: list[str]


def plan_prune(root: Path, max_ckpt_num: int, max_ckpt_mem_gb: float) -> PrunePlan:
    """What ``prune`` deletes: the training run's rotation (oldest first; the newest and the best never).

    One extra guard for a tool run after the fact: when the newest checkpoints are damaged, the
    newest *valid* one is pinned too, so pruning never leaves only damaged checkpoints behind.
    """
    if max_ckpt_num < 1:
        raise UserError(f"--max_ckpt_num must be at least 1, got {max_ckpt_num}")
    if max_ckpt_mem_gb <= 0:
        raise UserError(f"--max_ckpt_mem must be positive (GB), got {max_ckpt_mem_gb}")
    steps = require_committed(root)
    notes: list[str] = []
    pinned: set[int] = set()
    best = best_step(root, steps)
    if best is not None and best in steps:
        pinned.add(best)
        notes.append(f"{step_dir_name(best)} is the best checkpoint (--save_best_metric): kept")
    for step in steps:  # newest first
        problems = verify(root / step_dir_name(step))
        if not problems:
            if step != steps[0]:
                pinned.add(step)
                notes.append(f"{step_dir_name(step)} is the newest valid checkpoint: kept")
            break
        notes.append(f"{step_dir_name(step)} is damaged ({problems[0]})")
    else:
        notes.append("no committed checkpoint verifies")
    sizes = [(s, describe(root, s, check=False).size or dir_size(root / step_dir_name(s))) for s in steps]
    doomed = plan_rotation(sizes, steps[0], max_ckpt_num, max_ckpt_mem_gb * 1e9, frozenset(pinned))
    return PrunePlan(delete=doomed, keep=sorted(s for s in steps if s not in doomed), pinned=sorted(pinned),
                     notes=notes)


def prune(root: Path, max_ckpt_num: int, max_ckpt_mem_gb: float, dry_run: bool = False) -> PrunePlan:
    """Apply the rotation now, through a training run's own rotation (un-commit by rename, then delete)."""
    plan = plan_prune(root, max_ckpt_num, max_ckpt_mem_gb)
    if dry_run or not plan.delete:
        return plan
    try:
        done = rotate_checkpoints(root, keep=max(plan.keep), max_num=max_ckpt_num, max_bytes=max_ckpt_mem_gb * 1e9,
                                  pinned=frozenset(plan.pinned))
    except OSError as e:
        raise UserError(f"{root}: cannot delete a checkpoint ({e.strerror or e})") from None
    return PrunePlan(delete=done, keep=sorted(s for s in plan.keep + plan.delete if s not in done), pinned=plan.pinned,
                     notes=plan.notes)

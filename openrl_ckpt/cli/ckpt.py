"""Inspect, verify, export and prune checkpoint folders.

    python -m openrl_ckpt.cli.ckpt list   CKPT_PATH [--json] [--quick]
    python -m openrl_ckpt.cli.ckpt verify CKPT_PATH [--step N]
    python -m openrl_ckpt.cli.ckpt export CKPT_PATH [--step N] --output DIR [--model TAG] [--dtype bf16] [--merge_lora]
    python -m openrl_ckpt.cli.ckpt prune  CKPT_PATH --max_ckpt_num K --max_ckpt_mem GB [--dry_run]
    python -m openrl_ckpt.cli.ckpt convert CKPT_PATH --to universal [--step N] --output DIR

CKPT_PATH is a run's --ckpt_path (or one of its global_step<N> folders). Only committed checkpoints
(global_step<N>/ with a manifest) count, exactly as for resume. Nothing is deleted except by prune,
which applies the training run's own rotation. Damage (a changed, truncated or missing file, a missing
manifest) is one `error:` line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from openrl_ckpt.checkpoint import inspect as checkpoints
from openrl_ckpt.checkpoint.files import set_aside_dirs
from openrl_ckpt.cli.args import Parser
from openrl_ckpt.cli.entry import run
from openrl_ckpt.errors import UserError

if TYPE_CHECKING:
    import torch

DAMAGED = 1  # exit code for damaged checkpoints (usage errors exit 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="ckpt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    s = sub.add_parser("list", help="committed checkpoints: step, epoch, samples, size, time, valid/damaged")
    s.add_argument("ckpt_path")
    s.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    s.add_argument("--quick", action="store_true", help="check file presence and sizes only (no re-hash)")

    s = sub.add_parser("verify", help="re-hash every file against the manifest")
    s.add_argument("ckpt_path")
    s.add_argument("--step", type=int, default=None, help="only this step (default: every committed checkpoint)")

    s = sub.add_parser("export", help="a Hugging Face folder (or PEFT adapter) from a checkpoint")
    s.add_argument("ckpt_path")
    s.add_argument("--step", type=int, default=None, help="default: the newest committed checkpoint")
    s.add_argument("--output", required=True, help="a new folder")
    s.add_argument("--model", default=None, help="engine to export (SFT: model; PPO: actor or critic)")
    s.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: the training dtype")
    s.add_argument("--merge_lora", action="store_true", help="merge a LoRA adapter into its base model")
    s.add_argument("--base", default=None, help="base model folder for --merge_lora (default: the run's --pretrain)")

    s = sub.add_parser("prune", help="apply the rotation rules now (oldest first; the newest and the best stay)")
    s.add_argument("ckpt_path")
    s.add_argument("--max_ckpt_num", type=int, required=True)
    s.add_argument("--max_ckpt_mem", type=float, required=True, help="GB")
    s.add_argument("--dry_run", action="store_true", help="only say what would be deleted")

    s = sub.add_parser("convert", help="DeepSpeed's universal checkpoint format (any world size or ZeRO stage)")
    s.add_argument("ckpt_path")
    s.add_argument("--to", choices=["universal"], required=True)
    s.add_argument("--step", type=int, default=None, help="default: the newest committed checkpoint")
    s.add_argument("--output", required=True, help="a new folder")
    return p.parse_args(argv)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _damage_error(infos: list[checkpoints.CheckpointInfo]) -> UserError:
    bad = [i for i in infos if not i.valid]
    parts = [f"{i.path.name} ({'; '.join(i.problems[:3])}{'; ...' if len(i.problems) > 3 else ''})" for i in bad]
    return UserError(f"{len(bad)} of {len(infos)} checkpoint(s) damaged: {', '.join(parts)}", exit_code=DAMAGED)


def cmd_list(args: argparse.Namespace) -> None:
    root, step = checkpoints.resolve(args.ckpt_path)
    infos = checkpoints.list_checkpoints(root, quick=args.quick)
    if step is not None:
        infos = [i for i in infos if i.step == step]
    loose = checkpoints.uncommitted_step_dirs(root)
    aside = [p.relative_to(root).as_posix() for p in set_aside_dirs(root)]
    if args.json:
        print(json.dumps({"ckpt_path": str(root), "checkpoints": [i.to_json() for i in infos],
                          "uncommitted": [p.name for p in loose], "set_aside": aside}, indent=1))
    else:
        rows = [("step", "epoch", "samples", "size", "saved", "engines", "status")]
        for i in infos:
            engines = ",".join(i.engines) + (" +hf" if i.hf_copy else "")
            status = "valid" if i.valid else f"DAMAGED: {i.problems[0]}" + (
                f" (+{len(i.problems) - 1} more)" if len(i.problems) > 1 else "")
            rows.append((str(i.step), "-" if i.epoch is None else str(i.epoch),
                         "-" if i.consumed_samples is None else str(i.consumed_samples), _size(i.size),
                         _when(i.created_unix), engines or "-", status + ("  [best]" if i.best else "")))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
        for p in loose:
            print(f"{p.name}: no manifest.json, not a committed checkpoint (resume ignores it)")
        for name in aside:
            print(f"{name}: set aside by --resume_from (resume and rotation ignore it)")
    if any(not i.valid for i in infos):
        raise _damage_error(infos)


def cmd_verify(args: argparse.Namespace) -> None:
    root, step = checkpoints.resolve(args.ckpt_path, args.step)
    if step is not None:
        paths = [checkpoints.step_path(root, step)]
    else:
        paths = [root / f"global_step{s}" for s in sorted(checkpoints.require_committed(root))]
    infos = []
    for path in paths:
        info = checkpoints.describe(root, int(path.name.removeprefix("global_step")))
        infos.append(info)
        if info.valid:
            print(f"{path.name}: ok ({_size(info.size)})")
        else:
            print(f"{path.name}: DAMAGED")
            for problem in info.problems:
                print(f"  {problem}")
    if any(not i.valid for i in infos):
        raise _damage_error(infos)


def cmd_prune(args: argparse.Namespace) -> None:
    root, step = checkpoints.resolve(args.ckpt_path)
    if step is not None:
        raise UserError(f"prune works on the checkpoint folder, not on one step: use {root}")
    plan = checkpoints.prune(root, args.max_ckpt_num, args.max_ckpt_mem, dry_run=args.dry_run)
    for note in plan.notes:
        print(note)
    verb = "would delete" if args.dry_run else "deleted"
    for s in plan.delete:
        print(f"{verb} global_step{s}")
    print(f"kept {', '.join(f'global_step{s}' for s in plan.keep)}")
    left = [s for s in plan.delete if (root / f"global_step{s}").exists()] if not args.dry_run else []
    if left:
        raise UserError(f"could not delete {', '.join(f'global_step{s}' for s in left)} (see the warning above)",
                        exit_code=1)


def _verified(ckpt_path: str, step: int | None, what: str) -> Path:
    """The asked (default: newest) committed checkpoint, refused when it does not verify."""
    root, step = checkpoints.resolve(ckpt_path, step)
    if step is None:
        step = checkpoints.require_committed(root)[0]
    path = checkpoints.step_path(root, step)
    problems = checkpoints.verify(path)
    if problems:
        raise UserError(f"{path} is damaged, not {what} it: {'; '.join(problems[:3])}"
                        f"{'; ...' if len(problems) > 3 else ''}", exit_code=DAMAGED)
    return path


def cmd_export(args: argparse.Namespace) -> None:
    path = _verified(args.ckpt_path, args.step, "exporting")
    export(path, args.output, tag=args.model, dtype=args.dtype, merge_lora=args.merge_lora, base=args.base)


def cmd_convert(args: argparse.Namespace) -> None:
    """Every DeepSpeed engine of the checkpoint in the universal layout: ``DIR/<engine>/zero/<param>/`` and
    ``DIR/latest_universal``, which DeepSpeed loads on any world size or stage (``checkpoint.load_universal``).
    Runs of this project convert by themselves when --load_checkpoint meets another world size; this
    converts ahead of time, or for other DeepSpeed tools."""
    from openrl_ckpt.checkpoint.universal import convert_to_universal, needs_universal
    from openrl_ckpt.models.export import atomic_output, check_new_output

    check_new_output(args.output)
    path = _verified(args.ckpt_path, args.step, "converting")
    tags = [t for t in checkpoints.engines_of(path) if any((path / t).glob("*model_states.pt"))]
    if not tags:
        raise UserError(f"{path} holds no DeepSpeed engine (a --disable_ds_ckpt checkpoint): nothing to convert")
    flat = [t for t in tags if not needs_universal(path / t)]
    if flat:
        raise UserError(f"{path.name}/{flat[0]} holds no partitioned optimizer state (ZeRO-0 in fp32): it loads on "
                        f"any world size as it is")
    with atomic_output(args.output) as tmp:
        for tag in tags:
            print(f"converting {path.name}/{tag} to the universal format")
            try:
                convert_to_universal(path, tag, tmp)
            except (ValueError, KeyError, AssertionError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
                raise UserError(f"{path}/{tag}: DeepSpeed cannot convert it ({str(e).splitlines()[0][:200]})") from None
    print(f"wrote {args.output}")


def _pick_engine(path: Path, tag: str | None) -> str:
    tags = checkpoints.engines_of(path)
    if not tags:
        raise UserError(f"{path} holds no engine (neither DeepSpeed engine files nor a Hugging Face copy)")
    if tag is None:
        if len(tags) > 1:
            raise UserError(f"{path} holds several engines ({', '.join(tags)}): choose one with --model")
        return tags[0]
    if tag not in tags:
        raise UserError(f"--model {tag}: {path} holds {', '.join(tags)}")
    return tag


def export(path: Path, output: str, *, tag: str | None, dtype: str | None, merge_lora: bool, base: str | None) -> None:
    """One engine of a verified checkpoint as a Hugging Face folder (a PEFT adapter for a LoRA run,
    or merged into its base with ``merge_lora``), written to a temp folder and renamed to ``output``."""
    from openrl_ckpt.checkpoint.files import read_manifest
    from openrl_ckpt.models import export as model_export
    from openrl_ckpt.strategy.hf import DTYPES, dtype_name, read_engine_weights

    model_export.check_new_output(output)
    model_export.quiet_progress_bars()
    tag = _pick_engine(path, tag)
    hf_dir = path / checkpoints.HF_DIR / tag
    if not hf_dir.is_dir():
        raise UserError(f"{path} has no {checkpoints.HF_DIR}/{tag}/ (config and tokenizer recorded at save time), "
                        f"so it cannot be exported")
    adapter = model_export.is_adapter(hf_dir)
    if merge_lora and not adapter:
        raise UserError(f"--merge_lora: {path.name}/{tag} is not a LoRA run (no adapter config)")
    want = DTYPES[dtype] if dtype else None
    ds = any((path / tag).glob("*model_states.pt"))
    if ds:
        weights = read_engine_weights(path, tag, want)
        train_dtype, state_dict = weights.train_dtype, weights.state_dict
        source = f"ZeRO-{weights.zero_stage} {weights.source} weights"
    elif checkpoints.has_hf_weights(hf_dir):  # --disable_ds_ckpt: the Hugging Face copy is all there is
        train_dtype, state_dict, source = model_export.saved_dtype_of(hf_dir), None, "the Hugging Face copy"
    else:
        raise UserError(f"{path.name}/{tag} holds neither DeepSpeed engine files nor a Hugging Face copy with weights")
    out_dtype = want or train_dtype
    kind = "merged model" if merge_lora else "LoRA adapter" if adapter else "model"
    print(f"exporting {path.name}/{tag} ({source}, trained in {dtype_name(train_dtype)}) as a {kind} "
          f"in {dtype_name(out_dtype)} to {output}")
    if not (hf_dir / "tokenizer_config.json").exists() and not merge_lora:  # a merge takes the base's
        print(f"note: {path.name} recorded no tokenizer, so {output} has none")
    with model_export.atomic_output(output) as tmp:
        if merge_lora:
            adapter_cfg = json.loads((hf_dir / model_export.ADAPTER_CONFIG).read_text())
            given = base is not None
            base = base or adapter_cfg.get("base_model_name_or_path") or (
                read_manifest(path).get("meta") or {}).get("pretrain")
            # a model with a head (reward model, critic) trains it in full: apply_lora(causal_lm=False, modules_to_save)
            heads = adapter_cfg.get("modules_to_save") or []
            is_rm = not adapter_cfg.get("task_type") and bool(heads)
            if not base or not Path(base).is_dir():
                raise UserError(f"--merge_lora needs the base model: --base {base} is not a folder" if given else
                                f"--merge_lora needs the base model, and {base!r} (the run's --pretrain) is not a "
                                f"folder here: pass --base DIR")
            with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".adapter-") as adapter_dir:
                _write(Path(adapter_dir), state_dict, hf_dir, adapter, out_dtype, train_dtype)
                model_export.merge_lora(base, Path(adapter_dir), tmp, dtype=out_dtype, is_rm=is_rm,
                                        head_prefix=heads[0] if is_rm else "score")
        else:
            _write(tmp, state_dict, hf_dir, adapter, out_dtype, train_dtype)
    print(f"wrote {output}")


def _write(out: Path, state_dict: dict[str, torch.Tensor] | None, hf_dir: Path, adapter: bool, dtype: torch.dtype,
           train_dtype: torch.dtype) -> None:
    from openrl_ckpt.models import export as model_export

    if state_dict is None:
        model_export.copy_hf_folder(hf_dir, out, dtype)
    elif adapter:
        model_export.write_adapter(state_dict, hf_dir, out)
    else:
        model_export.write_full_model(state_dict, hf_dir, out, dtype, train_dtype)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    {"list": cmd_list, "verify": cmd_verify, "export": cmd_export, "prune": cmd_prune,
     "convert": cmd_convert}[args.command](args)
    sys.stdout.flush()


if __name__ == "__main__":
    run(main)

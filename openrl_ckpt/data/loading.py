"""Load the ``--dataset`` sources and blend them by ``--dataset_probs``; the train and eval datasets
the CLIs build from their data flags.

A source is a local file (.json, .jsonl, .parquet, .csv), a directory written by
``datasets.save_to_disk``, a directory of such data files, or a Hugging Face hub name.
Every user mistake becomes one ``UserError`` line naming the file, line or flag.

Columns that differ across sources are kept as their union (rows of a source that lacks a
column read ``None`` there); a column whose type differs between sources is an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from openrl_ckpt.errors import UserError

DATA_FILE_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")
_LOOKS_LIKE_FILE = re.compile(r"\.[A-Za-z][A-Za-z0-9]*$")

log = logging.getLogger("openrl_ckpt")


def load_blended_dataset(
    datasets_arg: str,
    probs_arg: str | None,
    *,
    seed: int,
    max_samples: int | None = None,
    split: str = "train",
    flag: str = "--dataset",
) -> datasets.Dataset:
    """Load every comma-separated source and mix them; same arguments give the same rows in the same order.

    Several sources are interleaved with probabilities ``probs_arg`` (equal when None) until every
    source is exhausted, so smaller sources are repeated rather than cut. ``max_samples`` (None or
    <= 0 means all) keeps the first rows of each source and of the blend.
    """
    sources = [s.strip() for s in datasets_arg.split(",")]
    if any(not s for s in sources):
        raise UserError(f"{flag}: empty source in '{datasets_arg}'")
    probs = _parse_probs(probs_arg, len(sources), flag)
    parts = [_take(_load_source(source, split, flag), max_samples) for source in sources]
    for source, part in zip(sources, parts):
        if len(part) == 0:
            raise UserError(f"{flag}: no rows in {source}")
    if len(parts) == 1:
        return parts[0]
    _check_column_types(list(zip(sources, parts)), flag)
    total = sum(probs)
    blended = datasets.interleave_datasets(
        parts,
        probabilities=[p / total for p in probs],
        seed=seed,
        stopping_strategy="all_exhausted",
    )
    return _take(blended, max_samples)


def load_dataset_from_flags(args: argparse.Namespace) -> datasets.Dataset:
    """The blend the shared data flags name: --dataset, --dataset_probs, --dataset_split, --max_samples."""
    return load_blended_dataset(args.dataset, args.dataset_probs, seed=args.seed, max_samples=args.max_samples,
                                split=args.dataset_split)


def load_datasets(args: argparse.Namespace, build: Callable[..., tuple[Any, Any]]) -> tuple[Any, Any]:
    """The --dataset blend and the evaluation rows, each through ``build(raw, source=...)``: --eval_dataset,
    or without it --dataset's own --eval_split where a source has one (OpenRLHF's eval rows), else None."""
    train_set, stats = build(load_dataset_from_flags(args), source=args.dataset)
    log.info("train data: %s", stats)
    if args.eval_dataset:
        raw, source = load_blended_dataset(args.eval_dataset, None, seed=args.seed, split=args.eval_split,
                                           flag="--eval_dataset"), args.eval_dataset
    else:
        raw, source = eval_split_of(args.dataset, args.eval_split, args.seed, args.max_samples), \
            f"{args.dataset} (split {args.eval_split})"
    if raw is None:
        return train_set, None
    eval_set, stats = build(raw, source=source)
    log.info("eval data: %s", stats)
    return train_set, eval_set


def eval_split_of(datasets_arg: str, split: str, seed: int, max_samples: int | None) -> datasets.Dataset | None:
    """The ``split`` rows of every --dataset source that has such a split (a saved dataset dict, a hub
    dataset), blended; None when none has (files have no splits). Never training rows in disguise."""
    parts = []
    for source in (s.strip() for s in datasets_arg.split(",")):
        path = os.path.expanduser(source)
        if os.path.isfile(path) or (not os.path.isdir(path) and _looks_local(source)):
            continue
        if os.path.isdir(path):
            dict_file = os.path.join(path, "dataset_dict.json")
            if os.path.isfile(dict_file) and split in json.loads(open(dict_file, encoding="utf-8").read()).get(
                    "splits", []):
                parts.append(_take(_load_saved(path, split, "--dataset"), max_samples))
            continue
        try:
            parts.append(_take(_load_hub(source, split, "--dataset"), max_samples))
        except UserError:  # no such split (or no hub): no evaluation from this source
            log.info("--dataset %s: no split '%s' to evaluate on", source, split)
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return datasets.concatenate_datasets(parts)


def _parse_probs(probs_arg: str | None, n_sources: int, flag: str) -> list[float]:
    """Parse ``{flag}_probs`` (OpenRLHF's naming); zero weights are refused: an all_exhausted blend would never end."""
    if probs_arg is None:
        return [1.0] * n_sources
    probs_flag = f"{flag}_probs"
    items = [p.strip() for p in probs_arg.split(",")]
    if len(items) != n_sources:
        raise UserError(
            f"{probs_flag} has {len(items)} value(s) but {flag} has {n_sources} source(s); "
            "give one probability per source"
        )
    probs = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"{probs_flag}: '{item}' is not a number") from None
        if not value > 0 or value == float("inf"):
            raise UserError(f"{probs_flag}: every probability must be a positive number, got '{item}'")
        probs.append(value)
    return probs


def _take(ds: datasets.Dataset, max_samples: int | None) -> datasets.Dataset:
    if max_samples is None or max_samples <= 0 or len(ds) <= max_samples:
        return ds
    return ds.select(range(max_samples))


def _load_source(source: str, split: str, flag: str) -> datasets.Dataset:
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return _load_file(path, flag)
    if os.path.isdir(path):
        return _load_directory(path, split, flag)
    if _looks_local(source):
        raise UserError(f"{flag}: no such file or directory: {source}")
    return _load_hub(source, split, flag)


def _looks_local(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything path-like is a missing local file instead."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or bool(_LOOKS_LIKE_FILE.search(source))


def _load_hub(name: str, split: str, flag: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # any failure (network, missing split, bad name) is the user's to fix
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{flag}: cannot load '{name}' from the Hugging Face hub ({reason})") from None
    if not isinstance(ds, datasets.Dataset):
        raise UserError(f"{flag}: '{name}' split '{split}' is not a map-style dataset")
    return ds


def _load_directory(path: str, split: str, flag: str) -> datasets.Dataset:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        return _load_saved(path, split, flag)
    files = sorted(
        name
        for name in os.listdir(path)
        if not name.startswith(".") and name.endswith(DATA_FILE_EXTENSIONS) and os.path.isfile(os.path.join(path, name))
    )
    if not files:
        raise UserError(
            f"{flag}: directory {path} holds no data files ({', '.join(DATA_FILE_EXTENSIONS)}) "
            "and was not written by save_to_disk"
        )
    parts = [(os.path.join(path, name), _load_file(os.path.join(path, name), flag)) for name in files]
    if len(parts) == 1:
        return parts[0][1]
    _check_column_types(parts, flag)
    return datasets.concatenate_datasets([part for _, part in parts])


def _load_saved(path: str, split: str, flag: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:
        raise UserError(f"{flag}: cannot read saved dataset {path} ({_short(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{flag}: {path} has no split '{split}'; available splits: {', '.join(loaded)}")
        return loaded[split]
    return loaded


def _load_file(path: str, flag: str) -> datasets.Dataset:
    ext = os.path.splitext(path)[1].lower()
    if ext not in DATA_FILE_EXTENSIONS:
        raise UserError(f"{flag}: {path}: unsupported file type '{ext}' (use {', '.join(DATA_FILE_EXTENSIONS)})")
    try:
        if ext in (".json", ".jsonl"):
            return _rows_to_dataset(list(_read_json_rows(path, ext)), path)
        if ext == ".parquet":
            table = pq.read_table(path)
        else:
            table = pa_csv.read_csv(path)
    except OSError as exc:
        raise UserError(f"cannot read {path} ({_short(exc)})") from None
    except (pa.ArrowException, ValueError) as exc:
        raise UserError(f"{path}: not a valid {ext[1:]} file ({_short(exc)})") from None
    return datasets.Dataset(table)


def _read_json_rows(path: str, ext: str) -> Iterator[dict]:
    """Yield the objects of a JSON-lines file, or of a .json file holding an array or JSON lines."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if ext == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        for i, item in enumerate(items, start=1):
            if not isinstance(item, dict):
                raise UserError(f"{path} item {i} of the JSON array: expected an object, got {_json_type(item)}")
            yield item
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            if ext == ".json" and _is_single_object(text):
                raise UserError(
                    f"{path}: holds a single JSON object; expected an array of objects or one object per line"
                ) from None
            raise UserError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise UserError(f"{path} line {lineno}: expected a JSON object, got {_json_type(item)}")
        yield item


def _is_single_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _json_type(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), "null"
    )


def _rows_to_dataset(rows: list[dict], path: str) -> datasets.Dataset:
    """Build a Dataset from the union of the rows' keys (first-seen order); a missing key reads None."""
    columns: dict[str, list] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    data = {key: [row.get(key) for row in rows] for key in columns}
    try:
        return datasets.Dataset.from_dict(data)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        for key, values in data.items():
            try:
                pa.array(values)
            except (pa.ArrowException, TypeError, ValueError):
                kinds = sorted({type(v).__name__ for v in values if v is not None})
                raise UserError(f"{path}: key '{key}' mixes incompatible value types ({', '.join(kinds)})") from None
        raise UserError(f"{path}: cannot build a table from its rows ({_short(exc)})") from None


def _check_column_types(parts: list[tuple[str, datasets.Dataset]], flag: str) -> None:
    """Refuse a column whose type differs between sources (null-typed columns match anything)."""
    seen: dict[str, tuple[str, datasets.features.features.FeatureType]] = {}
    for source, part in parts:
        for key, feature in part.features.items():
            if feature == datasets.Value("null"):
                continue
            if key in seen and seen[key][1] != feature:
                first_source, first_feature = seen[key]
                raise UserError(
                    f"{flag}: column '{key}' is {_describe(first_feature)} in {first_source} "
                    f"but {_describe(feature)} in {source}"
                )
            seen.setdefault(key, (source, feature))


def _describe(feature: datasets.features.features.FeatureType) -> str:
    return feature.dtype if isinstance(feature, datasets.Value) else repr(feature)


def _short(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]

"""Dataset sources, blending and the one-line errors for bad data."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest

from openrl_ckpt.data.loading import load_blended_dataset
from openrl_ckpt.errors import UserError

ROWS = [{"q": f"q{i}", "a": f"a{i}"} for i in range(5)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(arg: str, probs: str | None = None, **kwargs) -> datasets.Dataset:
    return load_blended_dataset(arg, probs, seed=0, **kwargs)


def test_jsonl_with_blank_lines_and_missing_keys(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "x", "a": "y"}\n\n{"q": "z", "extra": 3}\n')
    ds = load(str(path))
    assert ds.to_list() == [{"q": "x", "a": "y", "extra": None}, {"q": "z", "a": None, "extra": 3}]
    assert ds.features["a"] == datasets.Value("string")


def test_json_array_and_json_lines_in_dot_json(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps(ROWS, indent=2))
    lines = tmp_path / "lines.json"
    write_jsonl(lines, ROWS)
    assert load(str(array)).to_list() == ROWS
    assert load(str(lines)).to_list() == ROWS


def test_parquet_and_csv(tmp_path):
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    assert load(str(tmp_path / "d.parquet")).to_list() == ROWS
    assert load(str(tmp_path / "d.csv")).to_list() == ROWS


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])}
    ).save_to_disk(str(tmp_path / "dict"))
    assert load(str(tmp_path / "single")).to_list() == ROWS
    assert load(str(tmp_path / "dict"), split="test").to_list() == ROWS[:2]
    with pytest.raises(UserError, match="has no split 'validation'; available splits: train, test"):
        load(str(tmp_path / "dict"), split="validation")


def test_directory_of_files_is_loaded_sorted_by_name(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[3:])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:3])
    (tmp_path / "notes.md").write_text("ignored")
    assert load(str(tmp_path)).to_list() == ROWS


def test_empty_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="holds no data files"):
        load(str(tmp_path))


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"q": 1}\n\n{"q": 2}\n{"q": 3}\n{"q": 4}\n{"q": 5}\n{"q": 6 "a": 1}\n')
    with pytest.raises(UserError, match=r"data.jsonl line 7: not valid JSON \(Expecting ',' delimiter\)"):
        load(str(path))


def test_broken_json_array_names_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n {"q": 1},\n {"q": 2,}\n]\n')
    with pytest.raises(UserError, match=r"data.json line 3: not valid JSON"):
        load(str(path))


def test_non_object_rows_are_user_errors(tmp_path):
    lines = tmp_path / "d.jsonl"
    lines.write_text('{"q": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match="d.jsonl line 2: expected a JSON object, got an array"):
        load(str(lines))
    array = tmp_path / "d.json"
    array.write_text('[{"q": 1}, "x"]')
    with pytest.raises(UserError, match="d.json item 2 of the JSON array: expected an object, got a string"):
        load(str(array))
    single = tmp_path / "one.json"
    single.write_text('{\n  "data": []\n}\n')
    with pytest.raises(UserError, match="one.json: holds a single JSON object"):
        load(str(single))


def test_mixed_value_types_name_the_key(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"q": "x"}, {"q": ["y"]}])
    with pytest.raises(UserError, match=r"d.jsonl: key 'q' mixes incompatible value types \(list, str\)"):
        load(str(path))


def test_bad_parquet_and_unreadable_file(tmp_path, monkeypatch):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="bad.parquet: not a valid parquet file"):
        load(str(bad))

    def denied(path):  # chmod 0 does not stop root, so fake what open() would raise
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr("pyarrow.parquet.read_table", denied)
    with pytest.raises(UserError, match=r"^cannot read .*bad.parquet \(Permission denied\)$"):
        load(str(bad))


def test_missing_local_paths(tmp_path):
    for arg in ["./nope", str(tmp_path / "nope"), "data/train.jsonl", "a/b/c"]:
        with pytest.raises(UserError, match=f"--dataset: no such file or directory: {arg}"):
            load(arg)


def test_hub_failure_is_one_clear_line(monkeypatch):
    def fail(name, split):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(
        UserError,
        match=r"^--prompt_data: cannot load 'org/name' from the Hugging Face hub "
        r"\(Couldn't reach the Hugging Face Hub\)$",
    ):
        load("org/name", flag="--prompt_data")


def test_hub_success_passes_split(monkeypatch):
    seen = {}

    def fake(name, split):
        seen.update(name=name, split=split)
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert len(load("org/name", split="test")) == 5
    assert seen == {"name": "org/name", "split": "test"}


def test_probs_count_mismatch_and_bad_values(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", ROWS)
    with pytest.raises(UserError, match="--dataset_probs has 3 value.* but --dataset has 2 source"):
        load(f"{a},{b}", "0.2,0.3,0.5")
    for probs in ["0.5,x", "0.5,0", "1,-1"]:
        with pytest.raises(UserError, match="--dataset_probs"):
            load(f"{a},{b}", probs)
    with pytest.raises(UserError, match="empty source"):
        load(f"{a},")


def test_max_samples_per_source_and_blend(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"q": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": f"b{i}"} for i in range(10)])
    assert [r["q"] for r in load(a, max_samples=3)] == ["a0", "a1", "a2"]
    assert len(load(a, max_samples=0)) == 10
    blended = load(f"{a},{b}", max_samples=4)
    assert len(blended) == 4
    full = load(f"{a},{b}")
    assert set(full["q"]) == {f"a{i}" for i in range(10)} | {f"b{i}" for i in range(10)}


def test_empty_source_is_a_user_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(UserError, match=f"--dataset: no rows in {path}"):
        load(str(path))


def test_blend_is_deterministic_and_keeps_column_union(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"q": f"a{i}", "a": "x"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": f"b{i}", "score": i} for i in range(5)])
    first = load_blended_dataset(f"{a},{b}", "0.7,0.3", seed=42)
    second = load_blended_dataset(f"{a},{b}", "0.7,0.3", seed=42)
    other = load_blended_dataset(f"{a},{b}", "0.7,0.3", seed=43)
    assert first.to_list() == second.to_list()
    assert first["q"] != other["q"]
    assert set(first.column_names) == {"q", "a", "score"}
    assert {r["score"] for r in first if r["q"].startswith("a")} == {None}


def test_blend_with_conflicting_column_types_names_both(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"q": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": 1}])
    with pytest.raises(UserError, match=r"column 'q' is string in .*a.jsonl but int64 in .*b.jsonl"):
        load(f"{a},{b}")


def test_eval_rows_come_from_the_datasets_own_eval_split(tmp_path):
    from openrl_ckpt.data.loading import eval_split_of

    saved = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"q": "a"}, {"q": "b"}]),
                          "test": datasets.Dataset.from_list([{"q": "held out"}])}).save_to_disk(str(saved))
    (tmp_path / "rows.jsonl").write_text('{"q": "x"}\n')
    assert eval_split_of(str(saved), "test", seed=1, max_samples=None)["q"] == ["held out"]
    assert eval_split_of(f"{saved},{tmp_path / 'rows.jsonl'}", "test", seed=1, max_samples=None)["q"] == ["held out"]
    assert eval_split_of(str(saved), "validation", seed=1, max_samples=None) is None  # no such split: no eval
    assert eval_split_of(str(tmp_path / "rows.jsonl"), "test", seed=1, max_samples=None) is None  # files: none

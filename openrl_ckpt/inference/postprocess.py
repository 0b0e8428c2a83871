"""What the rm task makes of scored rows (``{"input", "output", "reward"}`` in file order) for the next
training stage: ``rs`` (rejection sampling, for train_sft), ``ca``/``csft`` (conditional SFT, for
train_sft) and ``iter_dpo`` (pairs for train_dpo). Pure functions of the rows, deterministic: ties
go to the row that comes first in the file, inputs keep the order of their first row."""

from __future__ import annotations

import enum
import math
import string
from dataclasses import dataclass
from typing import Any

from openrl_ckpt.errors import UserError


class PostProcessor(str, enum.Enum):
    """``--post_processor``: what the rm task writes instead of every scored row."""

    RS = "rs"  # rejection_sampling
    CA = "ca"  # conditional_sft
    CSFT = "csft"  # the same as ca, OpenRLHF's other name for it
    ITER_DPO = "iter_dpo"  # iterative_dpo_pairs


DEFAULT_REWARD_TEMPLATE = "{input} <rm_score>: {reward:.2f} "

Row = dict[str, Any]


def group_by_input(rows: list[Row]) -> list[list[Row]]:
    """The rows of each input, inputs in order of their first row, rows in file order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row["input"], []).append(row)
    return list(groups.values())


def _first_max(group: list[Row]) -> Row:
    best = group[0]
    for row in group[1:]:
        if row["reward"] > best["reward"]:
            best = row
    return best


def _first_min(group: list[Row]) -> Row:
    worst = group[0]
    for row in group[1:]:
        if row["reward"] < worst["reward"]:
            worst = row
    return worst


def rejection_sampling(rows: list[Row]) -> list[Row]:
    """The best-rewarded output of each input."""
    return [dict(_first_max(group)) for group in group_by_input(rows)]


def check_reward_template(template: str) -> None:
    """``--reward_template`` must name ``{input}`` and ``{reward}`` (a format spec such as ``:.2f`` is fine)
    and have nothing else to fill."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        if fields == {"input", "reward"}:
            template.format(input="", reward=0.0)
    except (ValueError, KeyError, IndexError) as e:
        raise UserError(f"--reward_template {template!r} cannot be filled ({e}); write literal braces as "
                        "'{{' and '}}'") from None
    if fields != {"input", "reward"}:
        raise UserError(f"--reward_template {template!r} must contain {{input}} and {{reward}} and no other fields")


def conditional_sft(rows: list[Row], template: str = DEFAULT_REWARD_TEMPLATE, normalize: bool = False) -> list[Row]:
    """Every row with its reward written into the input through ``template``; with ``normalize`` the
    rewards are first standardised over these rows ((r - mean) / std)."""
    rewards = [float(r["reward"]) for r in rows]
    if normalize and rewards:
        mean, std = mean_std(rewards)
        rewards = [(r - mean) / (std or 1.0) for r in rewards]
    return [{"input": template.format(input=row["input"], reward=reward), "output": row["output"], "reward": reward}
            for row, reward in zip(rows, rewards)]


@dataclass(frozen=True)
class PairStats:
    pairs: int
    single_output: int  # inputs with one output: nothing to compare
    no_preference: int  # inputs whose outputs are all the same text or all got the same reward


def iterative_dpo_pairs(rows: list[Row]) -> tuple[list[Row], PairStats]:
    """Per input, the max-reward output chosen and the min-reward one rejected."""
    pairs: list[Row] = []
    single = equal = 0
    for group in group_by_input(rows):
        if len(group) < 2:
            single += 1
            continue
        best, worst = _first_max(group), _first_min(group)
        # the same text scored in two micro batches can differ in the last bits: compare the texts too
        if best["reward"] == worst["reward"] or best["output"] == worst["output"]:
            equal += 1
            continue
        pairs.append({"prompt": best["input"], "chosen": best["output"], "chosen_reward": best["reward"],
                      "rejected": worst["output"], "rejected_reward": worst["reward"]})
    return pairs, PairStats(pairs=len(pairs), single_output=single, no_preference=equal)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation."""
    mean = math.fsum(values) / len(values)
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))

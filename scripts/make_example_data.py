#!/usr/bin/env python3
"""Generate the small datasets shipped in examples/data (deterministic, fixed seed).

    python scripts/make_example_data.py [--out examples/data] [--seed 1234]

The content is synthetic and *learnable* by a tiny model: arithmetic word
problems with worked answers, word reversal, capital-of-country facts, list
sorting and spelling. Preference data marks chosen answers with "Certainly"
and rejected ones with "Whatever" so a tiny reward model can separate them.
Re-running with the same seed reproduces the committed files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable

CAPITALS: list[tuple[str, str]] = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Brazil", "Brasilia"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Mexico", "Mexico City"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Turkey", "Ankara"), ("Russia", "Moscow"), ("Argentina", "Buenos Aires"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Morocco", "Rabat"),
]
NAMES = ["Tom", "Anna", "Ravi", "Mei", "Omar", "Lena", "Jonas", "Sofia", "Kofi", "Yuki"]
ITEMS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cookies", "cards"]
WORDS = (
    "river stone cloud apple music window garden orange silver candle forest pillow "
    "rocket castle yellow planet button winter summer basket dragon mirror bottle ladder "
    "spoon tiger violin pepper island meadow lantern harbor puzzle feather copper shadow"
).split()

Example = tuple[str, str]  # (question, correct worked answer)


def arithmetic(rng: random.Random) -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, 40)
    steps = rng.choice([1, 1, 2, 3, 5, 8])  # mostly short, some long multi-step problems
    story = [f"{name} has {total} {item}."]
    work = [f"{name} starts with {total} {item}."]
    for _ in range(steps):
        if rng.random() < 0.5 or total < 3:
            n = rng.randint(1, 20)
            story.append(f"Then {name} gets {n} more {item}.")
            work.append(f"After getting {n} more, {name} has {total} + {n} = {total + n} {item}.")
            total += n
        else:
            n = rng.randint(1, total - 1)
            story.append(f"Then {name} gives away {n} {item}.")
            work.append(f"After giving away {n}, {name} has {total} - {n} = {total - n} {item}.")
            total -= n
    question = " ".join(story) + f" How many {item} does {name} have now?"
    if steps == 1 and rng.random() < 0.5:
        return question, f"{name} has {total} {item} now."  # terse answers keep lengths varied
    return question, " ".join(work) + f" The answer is {total}."


def reversal(rng: random.Random) -> Example:
    n = rng.choice([4, 5, 6, 8, 10, 20, 40, 60])
    words = [rng.choice(WORDS) for _ in range(n)]
    return (
        "Reverse the order of these words: " + " ".join(words),
        "Reversed: " + " ".join(reversed(words)),
    )


def capital(rng: random.Random) -> Example:
    k = rng.choice([1, 1, 1, 3, 6, 12])
    picks = rng.sample(CAPITALS, k)
    if k == 1:
        country, city = picks[0]
        return f"What is the capital of {country}?", f"The capital of {country} is {city}."
    countries = ", ".join(c for c, _ in picks)
    answer = " ".join(f"The capital of {c} is {city}." for c, city in picks)
    return f"Name the capitals of these countries: {countries}.", answer


def sorting(rng: random.Random) -> Example:
    n = rng.choice([3, 4, 5, 8, 15, 30, 50])
    nums = [rng.randint(0, 99) for _ in range(n)]
    order = rng.choice(["ascending", "descending"])
    out = sorted(nums, reverse=(order == "descending"))
    return (
        f"Sort these numbers in {order} order: " + ", ".join(map(str, nums)),
        f"In {order} order the numbers are: " + ", ".join(map(str, out)) + ".",
    )


def spelling(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return f"Spell the word {word} letter by letter.", "The word " + word + " is spelled " + " ".join(word) + "."


TASKS: list[Callable[[random.Random], Example]] = [arithmetic, arithmetic, reversal, capital, sorting, spelling]


def corrupt(rng: random.Random, q: str, a: str) -> str:
    """A plausible wrong answer: a changed number or word, or a refusal."""
    words = a.split()
    idx = [i for i, w in enumerate(words) if w.strip(".,").isdigit()]
    if idx and rng.random() < 0.7:
        i = rng.choice(idx)
        tail = words[i][len(words[i].rstrip(".,")):]
        words[i] = str(int(words[i].rstrip(".,")) + rng.randint(1, 9)) + tail
        return " ".join(words)
    if rng.random() < 0.5 and len(words) > 3:
        rng.shuffle(words)
        return " ".join(words)
    return "I do not feel like answering that."


class Source:
    """Draws examples with globally unique questions, so train and eval never overlap."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seen: set[str] = set()

    def draw(self) -> Example:
        while True:
            q, a = self.rng.choice(TASKS)(self.rng)
            if q not in self.seen:
                self.seen.add(q)
                return q, a


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "examples", "data")))
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    src = Source(args.seed)
    rng = random.Random(args.seed + 1)  # separate stream for corruptions / labels

    sft = [{"question": q, "response": a} for q, a in (src.draw() for _ in range(400))]
    eval_sft = [{"question": q, "response": a} for q, a in (src.draw() for _ in range(40))]

    messages = []
    for i in range(100):
        q, a = src.draw()
        conv = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 5 == 0:  # some two-turn conversations
            q2, a2 = src.draw()
            conv += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        messages.append({"messages": conv})

    preference = []
    for _ in range(300):
        q, a = src.draw()
        preference.append({
            "prompt": q,
            "chosen": "Certainly! " + a,
            "rejected": "Whatever. " + corrupt(rng, q, a),
        })

    kto = []
    for i in range(200):
        q, a = src.draw()
        good = i % 2 == 0  # exactly balanced
        completion = "Certainly! " + a if good else "Whatever. " + corrupt(rng, q, a)
        kto.append({"prompt": q, "completion": completion, "label": good})
    rng.shuffle(kto)

    prompts = [{"prompt": src.draw()[0]} for _ in range(200)]

    out = {
        "sft.jsonl": sft,
        "eval_sft.jsonl": eval_sft,
        "sft_messages.jsonl": messages,
        "preference.jsonl": preference,
        "kto_unpaired.jsonl": kto,
        "prompts.jsonl": prompts,
    }
    for name, rows in out.items():
        path = os.path.join(args.out, name)
        write_jsonl(path, rows)
        print(f"{path}: {len(rows)} rows, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()

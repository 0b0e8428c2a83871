#!/usr/bin/env python3
"""Build the tiny tokenizer + model (and optionally a SmolLM2-135M-shaped model) locally.

    python scripts/make_tiny_assets.py --out .assets [--smollm2]

DIR/tiny     tokenizer + 2-layer Llama (loads with AutoTokenizer / AutoModelForCausalLM)
DIR/smollm2  random SmolLM2-135M-shaped Llama (~540 MB fp32) sharing the tiny tokenizer
No hub access needed; the tokenizer is trained on examples/data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run without install

from openrl_ckpt.utils.tiny import build_smollm2_shaped, build_tiny_model, build_tiny_tokenizer, example_texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--smollm2", action="store_true", help="also build DIR/smollm2 (benchmarks)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    start = time.time()
    tiny = os.path.abspath(os.path.join(args.out, "tiny"))
    build_tiny_tokenizer(tiny, example_texts())  # the model dir doubles as the tokenizer dir
    build_tiny_model(tiny, tiny, seed=args.seed)
    print(f"tiny: {tiny}")
    if args.smollm2:
        smol = os.path.abspath(os.path.join(args.out, "smollm2"))
        build_smollm2_shaped(smol, tiny, seed=args.seed)
        print(f"smollm2: {smol}")
    print(f"done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()

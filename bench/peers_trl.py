"""TRL side of bench/compare_peers.py: SFTTrainer or DPOTrainer on CPU, one process, fp32.

Runs inside the TRL venv (python bench/peers_trl.py ... with that venv's python), never imported by
openrl_ckpt. It prints ``bench_step N`` when TRL's own loop finishes optimizer step N (a
TrainerCallback), which compare_peers.py timestamps exactly as it does our ``step N/M`` lines.
"""

from __future__ import annotations

import argparse
import json

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback


class StepLog(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003 (TRL's callback signature)
        print(f"bench_step {state.global_step}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--algo", choices=["sft", "dpo"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="jsonl: prompt/completion rows (sft) or prompt/chosen/rejected (dpo)")
    p.add_argument("--max_len", type=int, required=True)
    p.add_argument("--micro", type=int, required=True)
    p.add_argument("--accum", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--save_steps", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--lr", type=float, default=1e-5)
    args = p.parse_args()

    with open(args.data) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    data = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32")
    common = dict(output_dir=args.out, per_device_train_batch_size=args.micro, gradient_accumulation_steps=args.accum,
                  max_steps=args.steps, save_strategy="steps", save_steps=args.save_steps, logging_steps=1,
                  learning_rate=args.lr, lr_scheduler_type="linear", use_cpu=True, bf16=False, report_to=[],
                  dataloader_num_workers=0, max_length=args.max_len, seed=42, disable_tqdm=True)
    if args.algo == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer,
                             callbacks=[StepLog()])
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, **common), train_dataset=data,
                             processing_class=tokenizer, callbacks=[StepLog()])
    trainer.train()


if __name__ == "__main__":
    main()

"""Serve a reward model over HTTP: POST /get_reward with {"query": [texts]} returns {"rewards": [...]}.

    python -m openrl_ckpt.cli.serve_rm --reward_pretrain RM_DIR --port 5000 --normalize_reward --batch_size 16

train_ppo (and batch_inference --eval_task rm) reach it with --remote_rm_url http://HOST:PORT/get_reward.
Stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from openrl_ckpt.cli.args import Parser, add_serving_model_args, bool_flag, check_serving_model_args
from openrl_ckpt.cli.entry import run
from openrl_ckpt.errors import UserError
from openrl_ckpt.utils.tracking import setup_logging

log = logging.getLogger("openrl_ckpt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="serve_rm", description=__doc__.splitlines()[0])
    g = p.add_argument_group("model")
    g.add_argument("--reward_pretrain", required=True, help="a reward model folder (train_rm --save_path)")
    g.add_argument("--value_head_prefix", "--head_prefix", dest="value_head_prefix", default="score")
    bool_flag(g, "--normalize_reward", "apply the reward mean/std train_rm --normalize_reward stored in the model")
    g.add_argument("--max_len", type=int, default=2048, help="longer texts are cut (EOS kept last)")
    add_serving_model_args(g)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0")
    g.add_argument("--port", type=int, default=5000, help="0: a free port (logged)")
    g.add_argument("--batch_size", type=int, default=None, help="texts per forward pass (default: all waiting)")
    g.add_argument("--max_wait_ms", type=float, default=5.0, help="how long a request waits for others to "
                   "share its forward pass")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_serving_model_args(args)
    if args.max_len < 2 or (args.batch_size is not None and args.batch_size < 1):
        raise UserError(f"--max_len must be at least 2 and --batch_size at least 1, got {args.max_len} and "
                        f"{args.batch_size}")
    setup_logging(0)
    import torch

    from openrl_ckpt.inference.reward_server import REWARD_PATH, RewardBatcher, RewardModelScorer, make_server
    from openrl_ckpt.models.actor import ModelConfig, load_tokenizer
    from openrl_ckpt.models.reward import load_reward_model, use_stored_normalization

    # 1. model: frozen, with the normalisation it stored when asked for
    tokenizer = load_tokenizer(args.reward_pretrain, use_fast=not args.disable_fast_tokenizer)
    model = load_reward_model(ModelConfig(pretrain=args.reward_pretrain, bf16=args.bf16, flash_attn=args.flash_attn),
                              args.value_head_prefix, require_head=True)
    use_stored_normalization(model, args.normalize_reward, args.reward_pretrain)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device).eval().requires_grad_(False)

    # 2. server: one scoring thread, requests on threads of their own
    batcher = RewardBatcher(RewardModelScorer(model, tokenizer, args.max_len, device, args.batch_size or 0),
                            max_wait_s=args.max_wait_ms / 1000)
    try:
        server = make_server(batcher, args.host, args.port)
    except OSError as e:
        raise UserError(f"--host {args.host} --port {args.port}: cannot listen ({e.strerror or e})") from None

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown waits for serve_forever

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    log.info("serving %s on http://%s:%d%s", args.reward_pretrain, host, port, REWARD_PATH)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        batcher.close()
    log.info("stopped after %d scoring rounds", batcher.batches)


if __name__ == "__main__":
    run(main)

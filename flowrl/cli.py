"""``flowrl`` command line: ``train``, ``sample``, ``eval``, ``gallery``, ``pretrain-digits``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from flowrl.config import TrainConfig
    from flowrl.trainer import train

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    if args.set:
        cfg = cfg.override(args.set)
    result = train(cfg)
    last = result.history[-1] if result.history else {}
    print(f"run directory: {result.run_dir}")
    if last:
        print(f"final train reward {last.get('reward/mean', float('nan')):.4f}, kl {last.get('kl/ref', 0.0):.3e}")
    if result.summary:
        print(result.summary)
    return 0


def _pretrain_digits(args: argparse.Namespace) -> int:
    from flowrl import pretrain_digits

    return pretrain_digits.main(args.rest) or 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from flowrl import gallery
    from flowrl.config import TrainConfig
    from flowrl.trainer import build_policy

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    if args.set:
        cfg = cfg.override(args.set)
    policy = build_policy(cfg.resolved(), Path(cfg.train.output_dir))
    if args.lora:
        policy.pipe.load_lora_weights(args.lora)
    prompts = args.prompt or ["a photo of a cat"]
    images = policy.generate(prompts, generator=torch.Generator().manual_seed(args.seed), num_steps=cfg.sampler.eval_num_steps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gallery.html_gallery(images, prompts, out)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowrl", description="RL fine-tuning of flow-matching models and causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run a training job from a YAML config")
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. train.learning_rate=1e-4")
    p.set_defaults(fn=_train)
    p = sub.add_parser("sample", help="sample images into an HTML gallery")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--lora", help="a LoRA folder saved by a run (<run>/lora)")
    p.add_argument("--prompt", action="append")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="gallery/index.html")
    p.set_defaults(fn=_sample)
    p = sub.add_parser("pretrain-digits", help="pretrain the embedded digits text-to-image model")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_pretrain_digits)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except Exception as exc:  # clear one-line errors for config/input mistakes
        from flowrl.config import ConfigError

        if isinstance(exc, (ConfigError, FileNotFoundError)) or type(exc).__name__ == "RewardError":
            print(f"flowrl: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

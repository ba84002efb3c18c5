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
    from accelerate import PartialState

    if not PartialState().is_main_process:  # several processes: one report
        return 0
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


def _load_for_eval(args: argparse.Namespace):
    """Policy (with an optional LoRA folder loaded by stock diffusers), reward set and config."""
    from flowrl.config import TrainConfig
    from flowrl.builders import _build_reward_set, build_policy

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    if args.set:
        cfg = cfg.override(args.set)
    policy = build_policy(cfg.resolved(), Path(cfg.train.output_dir))
    if getattr(args, "lora", None):
        policy.pipe.load_lora_weights(args.lora)
    return cfg, policy, _build_reward_set(cfg)


def _prompts_for(args: argparse.Namespace, cfg) -> list[str]:
    from flowrl.prompts import load_prompts

    if args.prompt:
        return list(args.prompt)
    return load_prompts(cfg.train.eval_prompts if cfg.train.eval_prompts is not None else cfg.train.prompts, field="train.eval_prompts")


def _generate(policy, prompts: list[str], cfg, seed: int):
    import torch

    images = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), 64):
        images.append(policy.generate(prompts[i : i + 64], generator=gen, num_steps=cfg.sampler.eval_num_steps))
    return torch.cat(images)


def _sample(args: argparse.Namespace) -> int:
    from flowrl import gallery

    cfg, policy, _ = _load_for_eval(args)
    prompts = _prompts_for(args, cfg)
    images = _generate(policy, prompts, cfg, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if images.dim() == 5:  # video [B, F, C, H, W]: one file per sample (+ poster) and a grid of posters
        from flowrl import media

        folder = out.with_suffix("")
        written = [media.save_video(v, folder / f"{i:04d}", fps=args.fps, format=args.video_format)["video"] for i, v in enumerate(images)]
        gallery.save_image(gallery.image_grid(images[:, 0], nrow=8, upscale=max(1, 64 // images.shape[-1])), out)
        print(f"wrote {len(prompts)} videos to {folder}/ ({written[0].suffix[1:]}, with .poster.png frames) and their posters to {out}")
        return 0
    gallery.save_image(gallery.image_grid(images, nrow=8, upscale=max(1, 64 // images.shape[-1])), out)
    print(f"wrote {len(prompts)} samples to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    cfg, policy, rewards = _load_for_eval(args)
    prompts = _prompts_for(args, cfg)
    images = _generate(policy, prompts, cfg, args.seed)
    table, names = rewards.score(images, prompts, {"eval": True})
    print(f"| reward | mean over {len(prompts)} prompts |\n|---|---|")
    for i, n in enumerate(names):
        print(f"| {n} | {float(table[:, i].nanmean()):.4f} |")
    if args.gallery:
        from flowrl import gallery

        first = table[:, 0].tolist() if len(names) else None
        path = gallery.html_gallery(images, prompts, Path(args.gallery), scores=first, title=f"flowrl eval ({names[0] if names else ''})")
        print(f"gallery: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowrl", description="RL fine-tuning of flow-matching models and causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run a training job from a YAML config")
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. train.learning_rate=1e-4")
    p.set_defaults(fn=_train)
    for name, fn, help_text in (
        ("sample", _sample, "sample images (ODE, eval steps) into one PNG grid; videos into mp4/WebP files"),
        ("eval", _eval, "score samples of the eval prompts with the config's rewards"),
        ("gallery", _eval, "eval plus an HTML gallery of every sample with its score"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML config (model, sampler, rewards, prompts)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--lora", help="a LoRA folder saved by a run (<run>/lora), loaded with stock load_lora_weights")
        p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: train.eval_prompts")
        p.add_argument("--seed", type=int, default=0)
        if name == "sample":
            p.add_argument("--out", default="samples.png", help="PNG grid; video models also write <out without .png>/NNNN.mp4 (or .webp)")
            p.add_argument("--fps", type=float, default=16.0, help="video frame rate of the written files")
            p.add_argument("--video-format", default="auto", choices=["auto", "mp4", "webp"], help="auto: mp4 when PyAV is installed, else animated WebP")
        else:
            p.add_argument("--gallery", default="gallery/index.html" if name == "gallery" else None, help="write an HTML gallery here")
        p.set_defaults(fn=fn)
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

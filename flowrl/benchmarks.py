"""Benchmarks for ``flowrl eval --benchmark NAME --prompts FILE``: which reward column a benchmark
reads and the table it prints in its own format, next to flowrl's usual report.

* ``geneval``: the ``geneval`` reward's ``strict`` column over GenEval's
  ``evaluation_metadata.jsonl``; printed as GenEval's ``summary_scores.py`` prints it (per tag the
  fraction of correct images, overall = the mean over tags).
* ``ocr``: the ``ocr`` reward over a prompt file whose prompts quote the text to render; printed as
  the mean score, the fraction read exactly, and the per-category means when the file has them.

A benchmark is a registry entry (:data:`BENCHMARKS`): a new one is a function of the evaluation
result and a ``register_benchmark`` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from flowrl.config import ConfigError
from flowrl.registry import Registry


@dataclass
class Benchmark:
    """``reward``: the reward the evaluation's reward set must hold; ``column``: the table column
    the benchmark reads; ``table(result, column)``: the printed text; ``options``: how to add the
    reward when the config lacks it (shown in the error)."""

    reward: str
    column: str
    table: Callable[[Any, str], str]
    options: str


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def per_sample_metadata(result: Any, key: str) -> list[Any]:
    """``metadata[key]`` of every sample (prompts × samples per prompt, samples consecutive)."""
    return [(m or {}).get(key) for m in result.metadata for _ in range(result.samples_per_prompt)]


def _column(result: Any, column: str) -> torch.Tensor:
    return result.table[:, result.names.index(column)]


def geneval_table(result: Any, column: str) -> str:
    from flowrl.rewards.geneval import format_geneval_summary, geneval_summary

    tags = per_sample_metadata(result, "tag")
    if any(t is None for t in tags):
        raise ConfigError("--benchmark geneval: some prompts have no 'tag' column; give GenEval's evaluation_metadata.jsonl with --prompts.")
    prompt_ids = [j for j in range(len(result.prompts)) for _ in range(result.samples_per_prompt)]
    return format_geneval_summary(geneval_summary(_column(result, column).tolist(), tags, prompt_ids))


def ocr_table(result: Any, column: str) -> str:
    v = _column(result, column)
    ok = torch.isfinite(v)
    lines = ["OCR", "===", f"Total images: {int(ok.sum())}", f"mean score (1 - normalised edit distance): {float(v[ok].mean()):.4f}",
             f"% read exactly: {float((v[ok] == 1).float().mean()):.2%}"]
    cats = per_sample_metadata(result, "category")
    if any(c is not None for c in cats):
        lines += ["", "By category", "==========="]
        for c in dict.fromkeys(x for x in cats if x is not None):
            idx = torch.tensor([x == c for x in cats]) & ok
            lines.append(f"{str(c):<16} = {float(v[idx].mean()):.4f} ({int(idx.sum())} images)")
    return "\n".join(lines)


BENCHMARKS.register("geneval")(Benchmark("geneval", "geneval/strict", geneval_table, "{geneval: {weight: 1, detector_path: <Mask2Former COCO-instance folder>, clip_path: <CLIP folder>}}"))
BENCHMARKS.register("ocr")(Benchmark("ocr", "ocr", ocr_table, "{ocr: {weight: 1, path: <OCR model folder>}}"))


def check_benchmark(name: str, reward_names: list[str]) -> Benchmark:
    """The benchmark ``name``; a clear error when unknown or when the config's rewards lack its reward."""
    if name not in BENCHMARKS:
        raise ConfigError(f"--benchmark {name}: unknown; known: {', '.join(BENCHMARKS.names())}.")
    b = BENCHMARKS.get(name)
    if b.reward not in reward_names:
        raise ConfigError(
            f"--benchmark {name} reads the reward '{b.reward}', which reward.rewards does not hold ({', '.join(reward_names)}); "
            f"add it to the config, or --set 'reward.rewards={b.options}'."
        )
    return b


__all__ = ["Benchmark", "BENCHMARKS", "check_benchmark", "geneval_table", "ocr_table", "per_sample_metadata"]

"""Prompt sources: an explicit list, a text file (one prompt per line), or a registered set
(``name`` or ``name:split``, e.g. ``digits:heldout``), plus prompt selection per iteration."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from flowrl.registry import Registry

#: name → fn(split: str | None) -> list[str]
PROMPT_SETS: Registry[Callable[[str | None], list[str]]] = Registry("prompt set")
register_prompt_set = PROMPT_SETS.register


def _import_builtin_sets() -> None:
    import importlib

    for mod in ("flowrl.digits_data", "flowrl.rewards.verifiers"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def load_prompts(spec: list[str] | str | None, *, field: str = "train.prompts") -> list[str]:
    """Resolve a prompt spec to a list of strings (clear error naming ``field`` if empty/unknown)."""
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        prompts = [str(p) for p in spec]
    elif Path(spec).is_file():
        prompts = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
    else:
        _import_builtin_sets()
        name, _, split = spec.partition(":")
        if name not in PROMPT_SETS:
            raise ValueError(
                f"{field}: '{spec}' is neither a file nor a known prompt set. Known sets: "
                f"{', '.join(PROMPT_SETS.names()) or '(none)'}; or give a list of prompts."
            )
        prompts = list(PROMPT_SETS.get(name)(split or None))
    if not prompts:
        source = f"the file {Path(spec).resolve()} holds no prompt (one per line; blank lines are skipped)" if isinstance(spec, str) and Path(spec).is_file() else f"{spec!r} holds no prompt"
        raise ValueError(f"{field}: {source}; give at least one prompt.")
    return prompts


@register_prompt_set("digits")
def digits_prompts(split: str | None) -> list[str]:
    """The digits miniature's prompts: ``digits:heldout`` (combinations never seen in pretraining,
    default), ``digits:pretrain``, ``digits:all`` (``flowrl.digits_data``)."""
    from flowrl.digits_data import prompt_split

    return prompt_split(split or "heldout")  # type: ignore[arg-type]

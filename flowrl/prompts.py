"""Prompt sources with per-prompt metadata.

``train.prompts`` / ``train.eval_prompts`` accept:

* a list (YAML) of strings, or of mappings with a prompt column (``[{prompt: "2+2?", answer: 4}]``);
* a ``.txt`` file: one prompt per line (no metadata);
* a ``.jsonl`` file: one JSON object per line (or one JSON string per line); Flow-GRPO's
  ``*_metadata.jsonl`` files (GenEval rows ``{"tag", "include", "exclude", "prompt"}``) load as is;
* a ``.json`` file: a list of objects (or strings);
* a ``.csv`` file with a header row (values are strings);
* a ``.parquet`` file (needs ``pyarrow``, or ``pandas`` with a parquet engine);
* a folder written by Hugging Face ``datasets``' ``Dataset.save_to_disk`` (needs ``datasets``; for
  a ``DatasetDict`` point at one split's sub-folder);
* a registered set, ``name`` or ``name:split`` (``digits:rl``, ``digits:eval``, ``arith:train``).

The prompt is read from the column ``prompt_column`` (``train.prompt_column``, default ``prompt``);
**every other column is the prompt's metadata**. The trainer hands each sample its own prompt's
metadata: rewards receive ``meta["metadata"]`` (one dict per sample, aligned with the outputs) and,
for every column ``k``, ``meta[k]`` (one value per sample, ``None`` where a row lacks it) — so
``exact_match`` finds ``meta["answer"]`` and a GenEval-style reward finds ``meta["include"]``.
Samples of one prompt (a group, a tree's leaves) share that prompt's metadata.

Relative file paths are resolved by the caller (the trainer resolves them against the config
file's folder, see :func:`resolve_prompt_path`).

**Image-conditioned prompts** (editing, image-to-video). A row may carry an ``image`` column: one
path or a list of paths (several reference images), relative to the prompt file's folder (for a
list in the YAML config: to the config file's folder; an absolute path stays as is). The paths are
resolved and checked when the prompts load, before any model does: a missing file is one error
naming the row and the path. Such a row's prompt is an :class:`ImagePrompt` — the prompt string
that also carries its resolved image paths (``prompt.images``); two rows with the same text and
different images are different prompts (their own group, their own prompt-cache entry). Image
pipelines (Flux Kontext, Wan image-to-video, ...) load the images from those paths in every
process; rewards receive the resolved paths as ``meta["image"]`` (a string, or a list for several
images) and can load them with :func:`load_source_images`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from flowrl.registry import Registry, import_if_present

#: name → fn(split: str | None) -> list[str] or list[dict] (rows with a ``prompt`` key)
PROMPT_SETS: Registry[Callable[[str | None], list[Any]]] = Registry("prompt set")
register_prompt_set = PROMPT_SETS.register

#: file suffixes read as tables (every other suffix is read as text, one prompt per line)
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

#: the row column holding source / reference image paths
IMAGE_COLUMN = "image"


class ImagePrompt(str):
    """A prompt string that carries the source images of its row (``images``: resolved paths).

    It is a ``str`` (so it flows wherever a prompt does: rollouts, logs, text encoders), but it
    compares and hashes with its images, so the same text with another image is another prompt:
    another group, another prompt-cache entry. ``str(p)`` is the plain text."""

    images: tuple[str, ...]

    def __new__(cls, text: str, images: Sequence[str]) -> "ImagePrompt":
        obj = super().__new__(cls, text)
        obj.images = tuple(str(i) for i in images)
        return obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and str.__eq__(self, other) and prompt_images(other) == self.images

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash((str(self), self.images))

    def __reduce__(self):  # pickles (multi-process gathers, checkpoints) with its images
        return (ImagePrompt, (str(self), self.images))

    def __repr__(self) -> str:
        return f"ImagePrompt({str(self)!r}, images={list(self.images)!r})"


def prompt_images(prompt: Any) -> tuple[str, ...]:
    """The image paths a prompt carries (``()`` for a plain string)."""
    return tuple(getattr(prompt, "images", ()) or ())


def load_source_images(paths: Any) -> Any:
    """PIL RGB image(s) of one sample's ``meta["image"]`` value: a path → an image, a list of
    paths → a list of images, ``None`` → ``None``."""
    if paths is None:
        return None
    if isinstance(paths, (list, tuple)):
        return [load_source_images(p) for p in paths]
    from PIL import Image

    with Image.open(paths) as im:
        return im.convert("RGB")


def _resolve_row_images(value: Any, base_dir: Path, where: str, i: int) -> list[str]:
    """A row's ``image`` value (path or list of paths) → absolute paths, each checked to exist."""
    paths = list(value) if isinstance(value, (list, tuple)) else [value]
    if not paths:
        raise ValueError(f"{where}: row {i}: the '{IMAGE_COLUMN}' column is an empty list; give a path or leave the column out.")
    out = []
    for p in paths:
        if not isinstance(p, (str, Path)) or not str(p).strip():
            raise ValueError(
                f"{where}: row {i}: '{IMAGE_COLUMN}' holds {type(p).__name__} {p!r}; it takes an image file path "
                "(or a list of paths) relative to the prompt file."
            )
        path = Path(str(p)).expanduser()
        full = path if path.is_absolute() else base_dir / path
        if not full.is_file():
            raise ValueError(
                f"{where}: row {i}: image '{p}' not found (looked for {full.resolve()}). "
                "Image paths are relative to the prompt file's folder (the config file's folder for a list in the config)."
            )
        out.append(str(full.resolve()))
    return out


@dataclass
class PromptSet:
    """Prompts and their metadata, one dict per prompt (empty when the source has none)."""

    prompts: list[str]
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.metadata:
            self.metadata = [{} for _ in self.prompts]
        if len(self.metadata) != len(self.prompts):
            raise ValueError(f"{len(self.metadata)} metadata rows for {len(self.prompts)} prompts.")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def columns(self) -> list[str]:
        """Metadata columns, in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.metadata:
            seen.update(dict.fromkeys(row))
        return list(seen)


def _import_builtin_sets() -> None:
    import_if_present(("flowrl.digits_data", "flowrl.rewards.verifiers"))


def _rows_to_set(rows: Iterable[Any], column: str, where: str, base_dir: str | Path | None = None) -> PromptSet:
    """Rows (strings, or mappings with ``column``) → :class:`PromptSet`. A row's ``image`` paths
    are resolved against ``base_dir`` (default: the working directory) and checked."""
    prompts: list[str] = []
    metadata: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            prompts.append(row)
            metadata.append({})
            continue
        if not isinstance(row, dict):
            raise ValueError(f"{where}: row {i} is {type(row).__name__}; expected a prompt string or a mapping with a '{column}' column.")
        if column not in row or row[column] is None:
            raise ValueError(
                f"{where}: row {i} has no '{column}' column (columns: {', '.join(map(str, row)) or 'none'}). "
                f"Set train.prompt_column to the column holding the prompt text."
            )
        meta = {k: v for k, v in row.items() if k != column}
        text = str(row[column])
        if meta.get(IMAGE_COLUMN) is not None:
            images = _resolve_row_images(meta[IMAGE_COLUMN], Path(base_dir) if base_dir is not None else Path.cwd(), where, i)
            meta[IMAGE_COLUMN] = images if isinstance(meta[IMAGE_COLUMN], (list, tuple)) else images[0]
            prompts.append(ImagePrompt(text, images))
        else:
            prompts.append(text)
        metadata.append(meta)
    return PromptSet(prompts, metadata)


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not a JSON line ({exc.msg}). A .jsonl file holds one JSON object per line.") from None
    return rows


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json prompt file holds a list of rows (objects or strings); got a {type(data).__name__}.")
    return data


def _read_csv(path: Path) -> list[Any]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return [dict(row) for row in csv.DictReader(f)]


def _read_parquet(path: Path) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        return pq.read_table(str(path)).to_pylist()
    try:
        import pandas as pd

        return pd.read_parquet(str(path)).to_dict(orient="records")
    except ImportError:
        raise ValueError(f"{path}: reading .parquet prompt files needs pyarrow: pip install pyarrow") from None


def _read_datasets_folder(path: Path) -> list[Any]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{path} is a folder: reading a Hugging Face datasets folder (save_to_disk) needs the datasets "
            "package: pip install datasets"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(
            f"{path} holds a DatasetDict with splits {', '.join(ds)}; point at one split's folder, e.g. {path / next(iter(ds))}."
        )
    return ds.to_list()


_READERS: dict[str, Callable[[Path], list[Any]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def read_prompt_file(path: str | Path, *, column: str = "prompt") -> PromptSet:
    """Read one prompt file or ``datasets`` folder (formats in the module doc)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise ValueError(f"{path} is a folder but not one written by datasets' save_to_disk (no dataset_info.json).")
        return _rows_to_set(_read_datasets_folder(path), column, str(path), path.parent)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:  # .txt and anything else: one prompt per line
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return PromptSet([line for line in lines if line])
    return _rows_to_set(reader(path), column, str(path), path.parent)


def resolve_prompt_path(spec: str, base_dir: str | Path | None) -> Path | None:
    """The file or folder ``spec`` names, or None if it names none (then it may be a set name).

    A relative path is looked up in ``base_dir`` (the config file's folder) first, then in the
    working directory."""
    path = Path(spec).expanduser()
    candidates = [path] if path.is_absolute() or base_dir is None else [Path(base_dir) / path, path]
    for c in candidates:
        if c.is_file() or c.is_dir():
            return c
    return None


def load_prompt_set(
    spec: Sequence[Any] | str | None,
    *,
    field: str = "train.prompts",
    column: str = "prompt",
    base_dir: str | Path | None = None,
) -> PromptSet:
    """Resolve a prompt spec to prompts and metadata (clear error naming ``field`` if empty/unknown)."""
    if spec is None:
        return PromptSet([])
    path = None
    try:
        if isinstance(spec, (list, tuple)):
            out = _rows_to_set(spec, column, field, base_dir)
        else:
            path = resolve_prompt_path(spec, base_dir)
            if path is not None:
                out = read_prompt_file(path, column=column)
            else:
                _import_builtin_sets()
                name, _, split = spec.partition(":")
                if name not in PROMPT_SETS:
                    looks_like_file = Path(spec).suffix.lower() in TABLE_SUFFIXES + (".txt",) or "/" in spec
                    where = f" (looked in {Path(base_dir) / spec} and ./{spec})" if base_dir is not None else ""
                    raise ValueError(
                        (f"'{spec}': no such file{where}. " if looks_like_file else f"'{spec}' is neither a file nor a known prompt set. ")
                        + f"Known sets: {', '.join(PROMPT_SETS.names()) or '(none)'}; or give a list of prompts."
                    )
                out = _rows_to_set(PROMPT_SETS.get(name)(split or None), "prompt", f"prompt set {name}")
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if msg.startswith(field) else f"{field}: {msg}") from None
    if not out.prompts:
        source = f"the file {path.resolve()}" if not isinstance(spec, (list, tuple)) and path is not None else repr(spec)
        raise ValueError(f"{field}: {source} holds no prompt (blank lines are skipped); give at least one prompt.")
    return out


def load_prompts(spec: Sequence[Any] | str | None, *, field: str = "train.prompts", column: str = "prompt", base_dir: str | Path | None = None) -> list[str]:
    """The prompt strings of a spec (:func:`load_prompt_set` without the metadata)."""
    return load_prompt_set(spec, field=field, column=column, base_dir=base_dir).prompts


# ----------------------------------------------------------------------- metadata → rewards
def reward_meta(metadata: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What rewards receive for per-sample metadata: ``{"metadata": [dict per sample], k: [value
    per sample] for every column k}`` (``None`` where a sample's row lacks ``k``)."""
    rows = list(metadata)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    out: dict[str, Any] = {"metadata": rows}
    for k in columns:
        if k != "metadata":
            out[k] = [row.get(k) for row in rows]
    return out


def category_column(metadata: Sequence[dict[str, Any]], requested: str | None = None) -> str | None:
    """The metadata column evaluation is broken down by: ``requested`` if given, else ``category``,
    else ``tag`` (GenEval's) when the rows have it; None when there is none."""
    if requested:
        return requested
    for key in ("category", "tag"):
        if any(key in row for row in metadata):
            return key
    return None


def category_means(values: Any, categories: Sequence[Any]) -> dict[str, tuple[float, int]]:
    """Mean of ``values`` ``[N]`` (NaN ignored) per category label → ``{label: (mean, n_samples)}``,
    labels in first-seen order; samples with a ``None`` label are left out."""
    import torch

    values = torch.as_tensor(values, dtype=torch.float32)
    out: dict[str, tuple[float, int]] = {}
    labels = [c for c in dict.fromkeys(categories) if c is not None]
    for label in labels:
        idx = torch.tensor([c == label for c in categories])
        out[str(label)] = (float(values[idx].nanmean()), int(idx.sum()))
    return out


# ------------------------------------------------------------------------------ built-ins
@register_prompt_set("digits")
def digits_prompts(split: str | None) -> list[dict[str, Any]]:
    """The digits miniature's prompts with their ``category`` (single, count, position):
    ``digits:rl`` (RL training), ``digits:eval`` (evaluation, never trained on by RL),
    ``digits:heldout`` (both: the combinations never seen in pretraining), ``digits:pretrain``,
    ``digits:all`` (``flowrl.digits_data``)."""
    from flowrl.digits_data import category, prompt_split

    return [{"prompt": p, "category": category(p)} for p in prompt_split(split or "heldout")]  # type: ignore[arg-type]

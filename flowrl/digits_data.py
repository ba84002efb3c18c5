"""Digit scenes: a miniature of GenEval built from scikit-learn's bundled handwritten digits.

scikit-learn ships 1,797 real handwritten digits (8×8, intensities 0–16; ``load_digits``, no
download). We compose them into 16×16 **scenes** of 2×2 cells, each cell either one 8×8 digit or
blank, described by prompts in a tiny closed grammar that tests what GenEval tests:

==============  ===========================  =============================================
category        prompt                       a scene is correct when
==============  ===========================  =============================================
single object   ``"a 3"``                    exactly one non-blank cell, and it is a 3
counting        ``"two 5s"``                 exactly two non-blank cells, both 5s
position        ``"a 3 left of a 7"``        exactly a 3 and a 7, the 3 in the left column
                                             and the 7 in the right one (rows free)
position        ``"a 9 above a 1"``          exactly a 9 and a 1, the 9 in the top row and
                                             the 1 in the bottom one (columns free)
==============  ===========================  =============================================

Relations use two different digits. There are 10 + 10 + 90 + 90 = 200 prompts.

A prompt's **layouts** (:func:`layouts`) are every assignment of digits to cells that makes the
scene correct; pretraining scenes are drawn uniformly from them (:func:`render_scenes`), and the
``digits`` judge (``flowrl.rewards.digits``) accepts exactly them. So "correct" means "inside the
support of the data distribution", as in GenEval.

Splits (all fixed, seeded by ``SPLIT_SEED``):

* digit **images**: ``"train"`` (80 %, stratified) composes pretraining scenes and trains the judge's
  classifier; ``"heldout"`` (20 %) measures the classifier and builds test scenes.
* **prompts**, three ways (GenEval-style: the base model is weak on unseen combinations, the
  reward is the judge):

  - ``"pretrain"`` (150): what the shipped base model was pretrained on — all 10 single digits,
    8 counting prompts and the remaining position pairs;
  - ``"heldout"`` (50): combinations never seen in pretraining — 2 counting prompts and 24 + 24
    position pairs (each ordered pair held out for one relation only; no digit loses its every
    appearance in a role). They are split in halves, balanced by category (1 counting prompt,
    12 "left of" and 12 "above" pairs each):
  - ``"rl"`` (25): the prompts RL trains on;
  - ``"eval"`` (25): the prompts RL is evaluated on — seen neither in pretraining nor by RL.

  ``"all"`` is all 200. Prompt **categories** (:func:`category`) are ``single``, ``count`` and
  ``position``; the evaluation split has no ``single`` prompt (every single digit is in pretraining).

Pixel convention: images are float32 ``[N, 1, 16, 16]`` in [0, 1], 0 = background (sklearn's
intensity / 16). The generator works on ``2·x − 1``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor

#: side of one cell (an sklearn digit) and of the square canvas, in pixels.
CELL = 8
GRID = 2
CANVAS = CELL * GRID
#: cell index → (row, col), row-major: 0 = top-left, 1 = top-right, 2 = bottom-left, 3 = bottom-right.
CELLS: tuple[tuple[int, int], ...] = tuple((r, c) for r in range(GRID) for c in range(GRID))
#: class index of a blank cell in the judge's classifier (digits are 0–9).
BLANK = 10
SPLIT_SEED = 0
HELDOUT_DIGIT_FRACTION = 0.2
HELDOUT_COUNTS = (4, 8)  # "two 4s", "two 8s" are never seen in pretraining
HELDOUT_PAIRS_PER_RELATION = 24

Kind = Literal["single", "count", "left", "above"]
KINDS: tuple[Kind, ...] = ("single", "count", "left", "above")


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: ``kind`` and its digits (one for single/count, two for relations)."""

    kind: Kind
    digits: tuple[int, ...]

    @property
    def text(self) -> str:
        if self.kind == "single":
            return f"a {self.digits[0]}"
        if self.kind == "count":
            return f"two {self.digits[0]}s"
        a, b = self.digits
        return f"a {a} left of a {b}" if self.kind == "left" else f"a {a} above a {b}"


_PATTERNS = (
    (re.compile(r"^a (\d)$"), "single"),
    (re.compile(r"^two (\d)s$"), "count"),
    (re.compile(r"^a (\d) left of a (\d)$"), "left"),
    (re.compile(r"^a (\d) above a (\d)$"), "above"),
)


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse one prompt of the grammar (case and surrounding spaces ignored)."""
    text = " ".join(prompt.lower().split())
    for pattern, kind in _PATTERNS:
        m = pattern.match(text)
        if m:
            digits = tuple(int(g) for g in m.groups())
            if kind in ("left", "above") and digits[0] == digits[1]:
                raise ValueError(f"'{prompt}': a relation needs two different digits (write 'two {digits[0]}s').")
            return PromptSpec(kind, digits)  # type: ignore[arg-type]
    raise ValueError(
        f"'{prompt}' is not a digits prompt. The grammar is: 'a 3', 'two 5s', 'a 3 left of a 7', 'a 9 above a 1'."
    )


def all_prompts() -> list[str]:
    """Every prompt of the grammar (200), in a fixed order."""
    specs = [PromptSpec("single", (d,)) for d in range(10)] + [PromptSpec("count", (d,)) for d in range(10)]
    pairs = [(a, b) for a in range(10) for b in range(10) if a != b]
    specs += [PromptSpec("left", p) for p in pairs] + [PromptSpec("above", p) for p in pairs]
    return [s.text for s in specs]


@lru_cache(maxsize=None)
def _heldout_prompts() -> tuple[str, ...]:
    rng = np.random.default_rng(SPLIT_SEED)
    pairs = [(a, b) for a in range(10) for b in range(10) if a != b]
    order = rng.permutation(len(pairs))
    # The first 2·K pairs of one random order: K held out for "left", the next K for "above", so an
    # ordered pair is never held out for both relations.
    k = HELDOUT_PAIRS_PER_RELATION
    left = sorted(pairs[i] for i in order[:k])
    above = sorted(pairs[i] for i in order[k : 2 * k])
    held = [PromptSpec("count", (d,)) for d in HELDOUT_COUNTS]
    held += [PromptSpec("left", p) for p in left] + [PromptSpec("above", p) for p in above]
    return tuple(s.text for s in held)


@lru_cache(maxsize=None)
def _rl_eval_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Halve the held-out prompts per kind (count, left, above) with a fixed seed: (rl, eval)."""
    rng = np.random.default_rng(SPLIT_SEED + 1)
    rl: list[str] = []
    ev: list[str] = []
    held = _heldout_prompts()
    for kind in KINDS:
        members = [p for p in held if parse_prompt(p).kind == kind]
        order = rng.permutation(len(members))
        half = len(members) // 2
        rl += [members[i] for i in sorted(order[:half])]
        ev += [members[i] for i in sorted(order[half:])]
    keep_order = {p: i for i, p in enumerate(held)}
    return tuple(sorted(rl, key=keep_order.get)), tuple(sorted(ev, key=keep_order.get))


PromptSplit = Literal["pretrain", "heldout", "rl", "eval", "all"]


def prompt_split(split: PromptSplit = "heldout") -> list[str]:
    """The prompts of a split: ``"pretrain"`` (150, the base model's pretraining prompts),
    ``"heldout"`` (the other 50), its halves ``"rl"`` (25, RL training) and ``"eval"`` (25, RL
    evaluation), or ``"all"``."""
    held = _heldout_prompts()
    if split == "heldout":
        return list(held)
    if split == "rl":
        return list(_rl_eval_split()[0])
    if split == "eval":
        return list(_rl_eval_split()[1])
    if split == "pretrain":
        return [p for p in all_prompts() if p not in set(held)]
    if split == "all":
        return all_prompts()
    raise ValueError(f"unknown digits prompt split '{split}'. Known: pretrain, heldout, rl, eval, all.")


#: prompt kind → GenEval-style category
CATEGORIES: dict[str, str] = {"single": "single", "count": "count", "left": "position", "above": "position"}


def category(prompt: str) -> str:
    """The category of a prompt: ``single``, ``count`` or ``position``."""
    return CATEGORIES[parse_prompt(prompt).kind]


def layouts(prompt: str | PromptSpec) -> list[tuple[int, ...]]:
    """Every scene that satisfies the prompt, as a tuple of 4 cell labels (0–9, or ``BLANK``)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    out: list[tuple[int, ...]] = []
    if spec.kind == "single":
        for i in range(len(CELLS)):
            out.append(tuple(spec.digits[0] if j == i else BLANK for j in range(len(CELLS))))
    elif spec.kind == "count":
        for i, j in itertools.combinations(range(len(CELLS)), 2):
            out.append(tuple(spec.digits[0] if k in (i, j) else BLANK for k in range(len(CELLS))))
    else:
        a, b = spec.digits
        axis = 1 if spec.kind == "left" else 0  # left: compare columns; above: compare rows
        for i, j in itertools.permutations(range(len(CELLS)), 2):
            if CELLS[i][axis] < CELLS[j][axis]:
                out.append(tuple(a if k == i else b if k == j else BLANK for k in range(len(CELLS))))
    return out


# -- real digit images -------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)  # [1797, 8, 8] in [0, 1]
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    heldout = np.zeros(len(labels), dtype=bool)
    for d in range(10):  # stratified: the same fraction of every digit
        idx = np.flatnonzero(labels == d)
        n = int(round(HELDOUT_DIGIT_FRACTION * len(idx)))
        heldout[rng.permutation(idx)[:n]] = True
    return images, labels, heldout


def load_digit_images(split: Literal["train", "heldout", "all"] = "train") -> tuple[Tensor, Tensor]:
    """sklearn digits of one split: images ``[N, 8, 8]`` float32 in [0, 1] and labels ``[N]``."""
    images, labels, heldout = _digits()
    if split == "train":
        keep = ~heldout
    elif split == "heldout":
        keep = heldout
    elif split == "all":
        keep = np.ones_like(heldout)
    else:
        raise ValueError(f"unknown digit split '{split}'. Known: train, heldout, all.")
    return torch.from_numpy(images[keep]).clone(), torch.from_numpy(labels[keep]).clone()


class SceneRenderer:
    """Draws scenes for prompts from one split of the real digit images.

    ``render(prompts, generator)`` picks, per prompt, a layout uniformly from :func:`layouts` and,
    per non-blank cell, a random real image of that digit. Everything random comes from
    ``generator``, so a seeded generator reproduces the same scenes.
    """

    def __init__(self, split: Literal["train", "heldout", "all"] = "train"):
        images, labels = load_digit_images(split)
        self.images = images
        self.by_label = [torch.nonzero(labels == d).flatten() for d in range(10)]
        self._layouts: dict[str, Tensor] = {}

    def _layout_table(self, prompt: str) -> Tensor:
        if prompt not in self._layouts:
            self._layouts[prompt] = torch.tensor(layouts(prompt), dtype=torch.long)  # [L, 4]
        return self._layouts[prompt]

    def sample_layouts(self, prompts: list[str], generator: torch.Generator | None = None) -> Tensor:
        """One random correct layout per prompt: ``[B, 4]`` cell labels."""
        out = torch.empty(len(prompts), len(CELLS), dtype=torch.long)
        for i, p in enumerate(prompts):
            table = self._layout_table(p)
            out[i] = table[torch.randint(len(table), (1,), generator=generator).item()]
        return out

    def render_layouts(self, cell_labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scenes ``[B, 1, 16, 16]`` in [0, 1] for cell labels ``[B, 4]`` (``BLANK`` = empty cell)."""
        batch = cell_labels.shape[0]
        canvas = torch.zeros(batch, 1, CANVAS, CANVAS)
        # one random draw per cell, used only where the cell holds a digit (keeps RNG use fixed)
        u = torch.rand(batch, len(CELLS), generator=generator)
        for k, (r, c) in enumerate(CELLS):
            for b in range(batch):
                d = int(cell_labels[b, k])
                if d == BLANK:
                    continue
                pool = self.by_label[d]
                img = self.images[pool[int(u[b, k] * len(pool))]]
                canvas[b, 0, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = img
        return canvas

    def render(self, prompts: list[str], generator: torch.Generator | None = None) -> Tensor:
        """Correct scenes ``[B, 1, 16, 16]`` in [0, 1] for ``prompts``."""
        return self.render_layouts(self.sample_layouts(prompts, generator), generator)


def split_cells(images: Tensor) -> Tensor:
    """``[B, C, 16, 16]`` scenes → ``[B, 4, 8, 8]`` cells (row-major, channels averaged)."""
    if images.shape[-2:] != (CANVAS, CANVAS):
        raise ValueError(f"digit scenes are {CANVAS}×{CANVAS}; got images of shape {tuple(images.shape)}.")
    x = images.float().mean(dim=1)  # [B, 16, 16]
    x = x.reshape(x.shape[0], GRID, CELL, GRID, CELL).permute(0, 1, 3, 2, 4)  # [B, r, c, 8, 8]
    return x.reshape(x.shape[0], GRID * GRID, CELL, CELL)

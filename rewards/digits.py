"""``digits``: the GenEval of the digits miniature — does a generated scene match its prompt?

A small CNN trained on scikit-learn's real handwritten digits (plus an 11th class, *blank*) reads
each 8×8 cell of a 16×16 scene. For a prompt (grammar in :mod:`flowrl.digits_data`) the judge
returns

* ``correct`` — 1 if the per-cell arg-max labels form one of the prompt's correct layouts
  (:func:`flowrl.digits_data.layouts`: exactly the named digits, in the named relation, every
  other cell blank), else 0. GenEval's binary per-prompt score.
* ``prob`` — the probability that the scene is correct when each cell's label is drawn from the
  classifier's softmax independently: ``Σ_layouts Π_cells p_cell(label)``. In [0, 1]; a soft,
  dense reward for RL (the layouts are disjoint events, so the sum is a probability).

The classifier (``assets/digits/judge/``: ``model.safetensors`` + ``config.json``) is trained by
:func:`train_digit_classifier` on the ``"train"`` split of the digit images with light noise /
intensity / shift augmentation; blank cells are zeros plus noise. Its accuracy on the 360
held-out digit images is recorded in ``config.json`` (≥ 95 % is tested).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowrl.digits_data import BLANK, CELL, layouts, load_digit_images, split_cells

from .base import Reward, register

NUM_CLASSES = 11  # digits 0–9 and BLANK


class DigitClassifier(nn.Module):
    """CNN over one 8×8 cell in [0, 1] → logits over 0–9 and blank (``[N, 1, 8, 8] → [N, 11]``)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4×4
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 2×2
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width * 4, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(self.features(x))

    # -- safe on-disk format: safetensors + json ------------------------------------------------
    def save(self, directory: str | Path, **extra: Any) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({"width": self.width, "num_classes": NUM_CLASSES, **extra}, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "DigitClassifier":
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"no digit classifier at {directory}. It ships in assets/digits/judge; retrain it with "
                "`python -m flowrl.pretrain_digits --judge-only`."
            )
        config = json.loads((directory / "config.json").read_text())
        model = cls(width=config["width"])
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()


def default_judge_dir() -> Path:
    from flowrl.paths import assets_dir

    return assets_dir() / "digits" / "judge"


# -- training --------------------------------------------------------------------------------


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Light augmentation of ``[N, 8, 8]`` cells: intensity scale, ±1-pixel shifts, Gaussian noise."""
    n = x.shape[0]
    x = x * (0.75 + 0.35 * torch.rand(n, 1, 1, generator=g))
    shift = torch.rand(n, generator=g) < 0.3
    if shift.any():
        dy = torch.randint(-1, 2, (n,), generator=g)
        dx = torch.randint(-1, 2, (n,), generator=g)
        padded = F.pad(x, (1, 1, 1, 1))
        shifted = torch.stack([padded[i, 1 + dy[i] : 1 + dy[i] + CELL, 1 + dx[i] : 1 + dx[i] + CELL] for i in range(n)])
        x = torch.where(shift[:, None, None], shifted, x)
    x = x + torch.randn(x.shape, generator=g) * (0.1 * torch.rand(n, 1, 1, generator=g))
    return x.clamp(0, 1)


def _blanks(n: int, g: torch.Generator) -> Tensor:
    """Blank cells: black plus Gaussian noise of random strength (σ ≤ 0.15), clamped to [0, 1]."""
    return (torch.randn(n, CELL, CELL, generator=g) * 0.15 * torch.rand(n, 1, 1, generator=g)).clamp(0, 1)


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, split: str = "heldout") -> float:
    """Top-1 accuracy on the clean real digit images of ``split`` (0–9 only)."""
    images, labels = load_digit_images(split)  # type: ignore[arg-type]
    model.eval()
    return (model(images).argmax(-1) == labels).float().mean().item()


def train_digit_classifier(*, seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, width: int = 32, log: bool = False) -> DigitClassifier:
    """Train the judge's CNN on the ``"train"`` digit images (+ blank class); deterministic per seed.

    About 20 s on one CPU core; held-out accuracy ≈ 98–99 %.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, labels = load_digit_images("train")
    model = DigitClassifier(width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(labels)
    n_blank = n // 10
    total = epochs * ((n + n_blank + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    for epoch in range(epochs):
        model.train()
        x = torch.cat([_augment(images, g), _blanks(n_blank, g)])
        y = torch.cat([labels, torch.full((n_blank,), BLANK)])
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if log and (epoch + 1) % 10 == 0:
            print(f"judge epoch {epoch + 1}: loss {loss.item():.4f} held-out acc {classifier_accuracy(model):.4f}")
    return model.eval()


# -- the judge ---------------------------------------------------------------------------------


@register("digits")
class DigitsJudge(Reward):
    """Scores 16×16 digit scenes against their prompts: ``{"correct": [B], "prob": [B]}``.

    >>> judge = DigitsJudge()                         # the shipped classifier
    >>> judge(images, ["a 3 left of a 7", "two 5s"])  # images [B, C, 16, 16] in [0, 1]
    >>> flowrl.rewards.get("digits", component="prob")  # through the registry

    ``component`` picks which component the reward's total (what a trainer optimises) uses, through
    ``component_weights``: ``"prob"`` (soft; the default, for training), ``"correct"`` (binary,
    GenEval's score) or ``"both"`` (their mean). ``__call__`` always returns both, so both are logged
    (``reward/digits/correct``, ``reward/digits/prob``).
    """

    name = "digits"
    modalities = ("image",)
    scale = "correct ∈ {0, 1}; prob ∈ [0, 1]"
    components = ("correct", "prob")
    _COMPONENT_WEIGHTS = {"prob": {"correct": 0.0, "prob": 1.0}, "correct": {"correct": 1.0, "prob": 0.0}, "both": {"correct": 0.5, "prob": 0.5}}

    def __init__(self, classifier: DigitClassifier | str | Path | None = None, *, component: Literal["prob", "correct", "both"] = "prob", device: str | torch.device | None = None):
        if component not in ("prob", "correct", "both"):
            raise ValueError(f"component must be 'prob', 'correct' or 'both'; got '{component}'.")
        if classifier is None:
            classifier = default_judge_dir()
        if not isinstance(classifier, nn.Module):
            classifier = DigitClassifier.load(classifier)
        self.classifier = classifier.eval().requires_grad_(False)
        if device is not None:
            self.classifier.to(device)
        self.component = component
        self.component_weights = dict(self._COMPONENT_WEIGHTS[component])
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._tables: dict[str, Tensor] = {}

    def _layouts(self, prompt: str) -> Tensor:
        if prompt not in self._tables:
            self._tables[prompt] = torch.tensor(layouts(prompt), dtype=torch.long)
        return self._tables[prompt]

    @torch.no_grad()
    def cell_log_probs(self, images: Tensor) -> Tensor:
        """Per-cell log-probabilities ``[B, 4, 11]`` of scenes ``[B, C, 16, 16]`` in [0, 1]."""
        cells = split_cells(images.clamp(0, 1))  # [B, 4, 8, 8]
        b = cells.shape[0]
        dev = next(self.classifier.parameters()).device
        logits = self.classifier(cells.reshape(b * 4, 1, CELL, CELL).to(dev))
        return logits.float().log_softmax(-1).reshape(b, 4, NUM_CLASSES).cpu()

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str], meta: dict | None = None) -> dict[str, Tensor]:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts; give one prompt per image.")
        logp = self.cell_log_probs(images)  # [B, 4, 11]
        pred = logp.argmax(-1)  # [B, 4]
        correct = torch.zeros(len(prompts))
        prob = torch.zeros(len(prompts))
        for i, p in enumerate(prompts):
            table = self._layouts(p)  # [L, 4]
            lp = logp[i].gather(1, table.T).sum(0)  # [L]: log Π_cells p(label) per layout
            prob[i] = lp.exp().sum().clamp(0, 1)
            correct[i] = float((table == pred[i]).all(-1).any())
        return {"correct": correct.to(images.device), "prob": prob.to(images.device)}

    def score(self, images: Tensor, prompts: list[str], meta: dict | None = None) -> Tensor:
        """The configured component as one scalar per image ``[B]``."""
        out = self(images, prompts, meta)
        return sum(w * out[k] for k, w in self.component_weights.items())

    @torch.no_grad()
    def describe(self, images: Tensor) -> list[str]:
        """What the judge sees in each scene, e.g. ``"3 . / . 7"`` (row-major, '.' = blank)."""
        pred = self.cell_log_probs(images).argmax(-1)
        sym = lambda k: "." if k == BLANK else str(int(k))  # noqa: E731
        return [f"{sym(r[0])} {sym(r[1])} / {sym(r[2])} {sym(r[3])}" for r in pred]

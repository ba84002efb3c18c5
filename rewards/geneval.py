"""GenEval (Ghosh et al. 2023) on transformers: an instance-segmentation model (Mask2Former, COCO
instance classes) finds the objects, a CLIP model names the colour of each, and GenEval's rules
check the prompt's metadata against them. No mmcv / mmdet.

The rules (:func:`evaluate_metadata`), as in GenEval's ``evaluation/evaluate_images.py``:

* detections of one class are kept when their confidence is ``> threshold`` (0.3; 0.9 for prompts
  tagged ``counting``), most confident first, at most ``max_objects`` (16) per class, then greedy
  non-maximum suppression at IoU ``nms_threshold`` (1.0: off, GenEval's default ``max_overlap``);
* every ``include`` clause ``{class, count[, color][, position]}`` must hold (AND): at least
  ``count`` detections of the class; with ``color``, at least ``count`` of the ``count`` most
  confident ones classified as that colour; with ``position: [relation, k]``, each of them must be
  in ``relation`` (``left of``/``right of``/``above``/``below``) to every object that include
  clause k matched (:func:`relative_position`, margin c = 0.1);
* no ``exclude`` clause ``{class, count}`` may hold (OR): fewer than ``count`` detections (this
  is how "exactly N" is written: include N, exclude N + 1).

A sample is correct when every clause holds (GenEval's ``correct``, the strict score).
The benchmark number is the mean over tags of each tag's fraction of correct images
(:func:`geneval_summary`).

Colour: each kept object is pasted through its mask onto a grey (#999) background, cropped to its
box, and classified zero-shot by CLIP among GenEval's 10 colours with its 3 templates ("a photo of a
{c} {object}", "a photo of a {c}-colored {object}", "a photo of a {c} object"; text embeddings
normalised, averaged over the templates, normalised again, as clip_benchmark's
``zero_shot_classifier``).

Detector post-processing follows mmdet's Mask2Former instance head (the model GenEval uses): the
top ``max_per_image`` (100) (query, class) pairs by class probability (softmax without the
no-object class), mask = sigmoid(mask logits) > 0.5 at image resolution, score = class
probability × mean mask probability inside the mask, box = the mask's extent (x₂ = last column + 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Reward, register

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
#: GenEval's object names, in COCO's 80-class order (the detector's label index i is CLASSNAMES[i])
CLASSNAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
RELATIONS = ("left of", "right of", "above", "below")


@dataclass
class Detection:
    """One detected object: ``box`` ``(x1, y1, x2, y2)`` in pixels, ``score`` in [0, 1], and its
    ``mask`` (bool ``[H, W]``; None when the detector gives boxes only)."""

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------ the rules
def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive pixel convention: area = (x₂ − x₁ + 1)·(y₂ − y₁ + 1)."""
    area = lambda x: max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)  # noqa: E731
    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float], *, margin: float = 0.1) -> set[str]:
    """Where A is relative to B: a subset of {left of, right of, above, below}.

    GenEval's rule: o = c_A − c_B (box centres), o' = sign(o)·max(|o| − c·(d_A + d_B), 0) with d the
    box sizes (w, h) and c = ``margin``; no relation when |o'| < 1e−3 on both axes; otherwise
    (dx, dy) = o' / ‖o‖ and "left of" if dx < −0.5, "right of" if dx > 0.5, "above" if dy < −0.5,
    "below" if dy > 0.5 (image y grows downwards).
    """
    a, b = np.asarray(box_a, dtype=np.float64)[:4], np.asarray(box_b, dtype=np.float64)[:4]
    ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    da, db = np.abs(a[2:] - a[:2]), np.abs(b[2:] - b[:2])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - margin * (da + db), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def keep_detections(
    detections: Mapping[str, Sequence[Detection]], *, threshold: float, max_objects: int = 16, nms_threshold: float = 1.0
) -> dict[str, list[Detection]]:
    """Per class: detections with ``score > threshold``, most confident first, at most
    ``max_objects``, then greedy NMS (drop any whose IoU with a kept one is ``>= nms_threshold``;
    1.0 = no NMS). Classes with nothing left are absent."""
    out: dict[str, list[Detection]] = {}
    for name, dets in detections.items():
        order = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[:max_objects]
        kept: list[Detection] = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if nms_threshold < 1:
                order = [d for d in order if box_iou(best.box, d.box) < nms_threshold]
        if kept:
            out[name] = kept
    return out


@dataclass
class GenEvalResult:
    """``correct``: every clause holds (GenEval's score of the image). ``satisfied`` / ``total``:
    clauses that hold / all clauses (flowrl's partial score ``satisfied / total``)."""

    correct: bool
    satisfied: int
    total: int
    reasons: list[str]

    @property
    def partial(self) -> float:
        return self.satisfied / self.total if self.total else 1.0


ColorFn = Callable[[list[Detection], str], list[str]]


def evaluate_metadata(detected: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any], classify_colors: ColorFn | None = None) -> GenEvalResult:
    """Check GenEval ``metadata`` (``include`` / ``exclude`` clauses) against the kept detections
    (:func:`keep_detections`, most confident first). ``classify_colors(objects, classname)`` names
    the colour of each object (needed only for clauses with ``color``). See the module doc."""
    correct, reasons, matched_groups = True, [], []
    satisfied = total = 0
    for req in metadata.get("include", None) or []:
        total += 1
        cls, count = req["class"], int(req["count"])
        found = list(detected.get(cls, []))[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                if classify_colors is None:
                    raise ValueError("a GenEval clause asks for a colour but no colour classifier was given.")
                colors = classify_colors(found, cls)
                if colors.count(req["color"]) < count:
                    matched = False
                    reasons.append(f"expected {req['color']} {cls}>={count}, found {colors.count(req['color'])} {req['color']}")
            if "position" in req and matched:
                relation, target = req["position"][0], int(req["position"][1])
                group = matched_groups[target] if 0 <= target < len(matched_groups) else None
                if group is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    for obj in found:
                        bad = next((t for t in group if relation not in relative_position(obj.box, t.box)), None)
                        if bad is not None:
                            matched = False
                            reasons.append(f"expected {cls} {relation} target, found {' and '.join(sorted(relative_position(obj.box, bad.box))) or 'no relation to the'} target")
                            break
        matched_groups.append(found if matched else None)
        correct &= matched
        satisfied += matched
    for req in metadata.get("exclude", None) or []:
        total += 1
        cls, count = req["class"], int(req["count"])
        n = len(detected.get(cls, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {n}")
        else:
            satisfied += 1
    return GenEvalResult(bool(correct), satisfied, total, reasons)


def geneval_summary(correct: Sequence[float], tags: Sequence[str], prompt_ids: Sequence[Any] | None = None) -> dict[str, Any]:
    """GenEval's summary: per tag the fraction of correct images; ``overall`` = the mean over tags
    (not over images); also % correct images and % prompts with at least one correct image."""
    c = np.asarray(correct, dtype=np.float64)
    ok = np.isfinite(c)
    per_tag: dict[str, tuple[float, int, int]] = {}
    for tag in dict.fromkeys(tags):
        idx = np.array([t == tag for t in tags]) & ok
        per_tag[str(tag)] = (float(c[idx].mean()) if idx.any() else float("nan"), int(c[idx].sum()), int(idx.sum()))
    out: dict[str, Any] = {"images": int(ok.sum()), "correct_images": float(c[ok].mean()) if ok.any() else float("nan"), "tags": per_tag,
                           "overall": float(np.nanmean([v[0] for v in per_tag.values()])) if per_tag else float("nan")}
    if prompt_ids is not None:
        by_prompt: dict[Any, bool] = {}
        for pid, v, good in zip(prompt_ids, c, ok):
            if good:
                by_prompt[pid] = by_prompt.get(pid, False) or bool(v > 0.5)
        out["prompts"] = len(by_prompt)
        out["correct_prompts"] = float(np.mean(list(by_prompt.values()))) if by_prompt else float("nan")
    return out


def format_geneval_summary(s: Mapping[str, Any]) -> str:
    """The summary printed as GenEval's ``summary_scores.py`` prints it."""
    lines = ["Summary", "=======", f"Total images: {s['images']}"]
    if "prompts" in s:
        lines.append(f"Total prompts: {s['prompts']}")
    lines.append(f"% correct images: {s['correct_images']:.2%}")
    if "correct_prompts" in s:
        lines.append(f"% correct prompts: {s['correct_prompts']:.2%}")
    lines += ["", "Task breakdown", "=============="]
    for tag, (acc, n_ok, n) in s["tags"].items():
        lines.append(f"{tag:<16} = {acc:.2%} ({n_ok} / {n})")
    lines += ["", f"Overall score (avg. over tasks): {s['overall']:.5f}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the models
def instance_detections(class_logits: Tensor, mask_logits: Tensor, *, max_per_image: int = 100, mask_threshold: float = 0.5) -> list[tuple[int, float, tuple[float, float, float, float], np.ndarray]]:
    """mmdet's Mask2Former instance post-processing of one image: ``class_logits`` ``[Q, C + 1]``
    (last = no object), ``mask_logits`` ``[Q, H, W]`` at image resolution → ``(label, score, box,
    mask)`` for the top ``max_per_image`` (query, class) pairs (see the module doc)."""
    q, c1 = class_logits.shape
    probs = class_logits.float().softmax(-1)[:, :-1]
    k = min(max_per_image, probs.numel())
    top, idx = probs.flatten().topk(k, sorted=True)
    labels, queries = idx % (c1 - 1), idx // (c1 - 1)
    m = mask_logits[queries].float().sigmoid()
    masks = m > mask_threshold
    mask_scores = (m * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    scores = top * mask_scores
    out = []
    for i in range(k):
        mk = masks[i]
        xs, ys = torch.where(mk.any(0))[0], torch.where(mk.any(1))[0]
        box = (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)) if len(xs) and len(ys) else (0.0, 0.0, 0.0, 0.0)
        out.append((int(labels[i]), float(scores[i]), box, mk.numpy()))
    return out


def to_uint8_hwc(image: Tensor) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] → uint8 ``[H, W, 3]`` via round(x·255) (the PNG a GenEval run reads)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if arr.shape[0] == 1:
        arr = arr.expand(3, -1, -1)
    return arr.permute(1, 2, 0).numpy()


class GenEvalModels:
    """The detector (transformers ``AutoModelForUniversalSegmentation``: Mask2Former COCO instance,
    80 classes in COCO order) and the colour classifier (transformers ``CLIPModel``), frozen."""

    def __init__(self, detector: str, clip: str, *, clip_processor: str | None = None, device: Any = "cpu", classnames: Sequence[str] = CLASSNAMES, max_per_image: int = 100, background: str = "#999999"):
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForUniversalSegmentation

        from .clip import HFCLIP

        self.device = torch.device(device)
        n = int(AutoConfig.from_pretrained(detector, local_files_only=True).num_labels)
        if n != len(classnames):
            raise ValueError(f"geneval: the detector at {detector} has {n} classes; GenEval needs a COCO-instance model with {len(classnames)} (or give `classnames`).")
        self.processor = AutoImageProcessor.from_pretrained(detector, local_files_only=True)
        self.detector = AutoModelForUniversalSegmentation.from_pretrained(detector, local_files_only=True).to(self.device).eval().requires_grad_(False)
        self.classnames = tuple(classnames)
        self.clip = HFCLIP(clip, clip_processor, device=self.device)
        self.max_per_image = max_per_image
        bg = background.lstrip("#")
        bg = "".join(ch * 2 for ch in bg) if len(bg) == 3 else bg
        self.background = tuple(int(bg[i : i + 2], 16) for i in (0, 2, 4))
        self._classifiers: dict[str, Tensor] = {}

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> dict[str, list[Detection]]:
        """All post-processed detections of one uint8 ``[H, W, 3]`` image, by class name."""
        h, w = image.shape[:2]
        inputs = self.processor(images=[image], return_tensors="pt")
        pixel_mask = inputs.get("pixel_mask")
        out = self.detector(pixel_values=inputs["pixel_values"].to(self.device), pixel_mask=pixel_mask.to(self.device) if pixel_mask is not None else None)
        ph, pw = inputs["pixel_values"].shape[-2:]
        logits = torch.nn.functional.interpolate(out.masks_queries_logits.float(), size=(ph, pw), mode="bilinear", align_corners=False)[0]
        if pixel_mask is not None:  # drop the padding, then back to the image's own size
            vh, vw = int(pixel_mask[0].any(1).sum()), int(pixel_mask[0].any(0).sum())
            logits = logits[:, :vh, :vw]
        logits = torch.nn.functional.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        found: dict[str, list[Detection]] = {}
        for label, score, box, mask in instance_detections(out.class_queries_logits[0].cpu(), logits.cpu(), max_per_image=self.max_per_image):
            found.setdefault(self.classnames[label], []).append(Detection(box, score, mask))
        return found

    def _classifier(self, classname: str) -> Tensor:
        if classname not in self._classifiers:
            weights = []
            for c in COLORS:
                feats = self.clip.text_features([t.format(c=c, obj=classname) for t in COLOR_TEMPLATES])
                mean = feats.mean(0)
                weights.append(mean / mean.norm())
            self._classifiers[classname] = torch.stack(weights, 1)  # [D, 10]
        return self._classifiers[classname]

    @torch.no_grad()
    def classify_colors(self, image: np.ndarray, objects: list[Detection], classname: str) -> list[str]:
        """GenEval's colour of each object: mask onto the grey background, crop to the box, CLIP
        zero-shot among :data:`COLORS`."""
        from PIL import Image

        pil = Image.fromarray(image).convert("RGB")
        blank = Image.new("RGB", pil.size, color=self.background)
        clf = self._classifier(classname)
        names = []
        for obj in objects:
            crop = Image.composite(pil, blank, Image.fromarray(obj.mask)) if obj.mask is not None else pil
            x1, y1, x2, y2 = (int(round(v)) for v in obj.box)  # PIL's own rounding of a float box
            crop = crop.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))  # at least one pixel
            x = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float() / 255
            feats = self.clip.image_features(x)
            names.append(COLORS[int((feats @ clf).argmax(-1)[0])])
        return names


@register("geneval")
class GenEval(Reward):
    """GenEval as a reward: the prompt's GenEval metadata (``tag``, ``include``, ``exclude``
    columns of the prompt file) checked on each image. Components: ``strict`` (1 if every clause
    holds, GenEval's score) and ``partial`` (fraction of clauses that hold; flowrl's, logged with
    weight 0 unless ``component_weights`` says otherwise). Video: not supported (images only).

    ``detector_path``: a local transformers Mask2Former COCO-instance folder; ``clip_path``: a local
    transformers CLIP folder (GenEval uses ViT-L/14). Thresholds default to GenEval's.
    """

    name = "geneval"
    scale = "strict in {0,1}; partial in [0,1]"
    component_weights = {"strict": 1.0, "partial": 0.0}

    def __init__(self, detector_path: str, clip_path: str, *, clip_processor_path: str | None = None, device="cpu", threshold: float = 0.3, counting_threshold: float = 0.9,
                 max_objects: int = 16, nms_threshold: float = 1.0, position_margin: float = 0.1, max_per_image: int = 100, background: str = "#999999", batch_size: int | None = None):
        self.models = GenEvalModels(detector_path, clip_path, clip_processor=clip_processor_path, device=device, max_per_image=max_per_image, background=background)
        self.device = self.models.device
        self.threshold, self.counting_threshold, self.max_objects, self.nms_threshold = threshold, counting_threshold, max_objects, nms_threshold
        self.position_margin, self.batch_size = position_margin, batch_size
        self.last_reasons: list[str] = []

    def score_one(self, image: Tensor, metadata: Mapping[str, Any]) -> GenEvalResult:
        arr = to_uint8_hwc(image)
        thr = self.counting_threshold if metadata.get("tag") == "counting" else self.threshold
        kept = keep_detections(self.models.detect(arr), threshold=thr, max_objects=self.max_objects, nms_threshold=self.nms_threshold)
        return evaluate_metadata(kept, metadata, lambda objs, cls: self.models.classify_colors(arr, objs, cls))

    def __call__(self, outputs, prompts, meta=None):
        if not isinstance(outputs, Tensor) or outputs.dim() != 4:
            raise ValueError("geneval scores images [B, C, H, W]; got " + (f"shape {tuple(outputs.shape)}" if isinstance(outputs, Tensor) else type(outputs).__name__))
        rows = (meta or {}).get("metadata")
        if rows is None or len(rows) != len(prompts) or any(not isinstance(r, Mapping) or "include" not in r for r in rows):
            raise ValueError("geneval needs GenEval metadata per prompt (columns tag, include, exclude): use a prompt file such as "
                             "GenEval's evaluation_metadata.jsonl for train.prompts / train.eval_prompts.")
        results = [self.score_one(img, row) for img, row in zip(outputs, rows)]
        self.last_reasons = ["; ".join(r.reasons) for r in results]
        return {"strict": torch.tensor([float(r.correct) for r in results]), "partial": torch.tensor([r.partial for r in results], dtype=torch.float32)}


__all__ = ["GenEval", "GenEvalModels", "Detection", "GenEvalResult", "box_iou", "relative_position", "keep_detections", "evaluate_metadata",
           "instance_detections", "geneval_summary", "format_geneval_summary", "COLORS", "CLASSNAMES"]

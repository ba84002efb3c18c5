"""GenEval's rules against hand-built detections, the OCR reward's definition against hand-computed
cases, and both rewards' model plumbing with tiny random models saved and loaded back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from flowrl.rewards.geneval import (  # noqa: E402
    CLASSNAMES,
    Detection,
    box_iou,
    evaluate_metadata,
    format_geneval_summary,
    geneval_summary,
    instance_detections,
    keep_detections,
    relative_position,
)
from flowrl.rewards.ocr import levenshtein, ocr_score, quoted_target  # noqa: E402


def D(x1, y1, x2, y2, score=0.95, mask=None):
    return Detection((x1, y1, x2, y2), score, mask)


# ------------------------------------------------------------------------------ geneval rules
def test_box_iou_inclusive_pixels():
    # areas (10·10) and (10·10), intersection [5..9]x[0..9] = 5·10 → 50 / 150
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 9, 9), (20, 20, 30, 30)) == 0


def test_relative_position_margin_rule():
    # A centre (15, 50), B centre (85, 50); widths 10 each: o = (−70, 0), o' = (−70 + 0.1·20, 0) = (−68, 0)
    # dx = −68/70 < −0.5 → left of
    assert relative_position((10, 45, 20, 55), (80, 45, 90, 55)) == {"left of"}
    assert relative_position((80, 45, 90, 55), (10, 45, 20, 55)) == {"right of"}
    # diagonal: o = (−40, −40), dims 20+20 → o' = (−36, −36), /‖o‖=56.57 → (−0.636, −0.636): left of and above
    assert relative_position((0, 0, 20, 20), (40, 40, 60, 60)) == {"left of", "above"}
    # centres 6 px apart but boxes 40 wide: |o| − 0.1·80 < 0 → no relation
    assert relative_position((0, 0, 40, 40), (6, 0, 46, 40)) == set()
    # mostly below, a little to the right: o = (10, 60), dims (20+20, 20+20) → o' = (6, 56), /60.83 → (0.099, 0.921)
    assert relative_position((10, 60, 30, 80), (0, 0, 20, 20)) == {"below"}


def test_keep_detections_threshold_order_cap_nms():
    dets = {"dog": [D(0, 0, 9, 9, 0.5), D(50, 50, 59, 59, 0.95), D(1, 0, 10, 9, 0.31), D(0, 0, 5, 5, 0.3)]}
    kept = keep_detections(dets, threshold=0.3)
    assert [d.score for d in kept["dog"]] == [0.95, 0.5, 0.31]  # > 0.3 strictly, most confident first
    assert [d.score for d in keep_detections(dets, threshold=0.3, max_objects=2)["dog"]] == [0.95, 0.5]
    # NMS at 0.5: box 3 overlaps box 1 with IoU 90/110 = 0.82 → dropped
    assert [d.score for d in keep_detections(dets, threshold=0.3, nms_threshold=0.5)["dog"]] == [0.95, 0.5]
    assert keep_detections({"cat": [D(0, 0, 1, 1, 0.2)]}, threshold=0.3) == {}


def test_single_and_two_objects_and_exclusion():
    det = {"dog": [D(0, 0, 10, 10)], "cat": [D(20, 0, 30, 10)]}
    assert evaluate_metadata(det, {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}).correct
    r = evaluate_metadata(det, {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "bus", "count": 1}]})
    assert (r.correct, r.satisfied, r.total, r.partial) == (False, 1, 2, 0.5)
    assert "expected bus>=1, found 0" in r.reasons[0]


def test_counting_exactly_n_via_exclude():
    meta = {"tag": "counting", "include": [{"class": "apple", "count": 3}], "exclude": [{"class": "apple", "count": 4}]}
    three = {"apple": [D(i * 20, 0, i * 20 + 10, 10) for i in range(3)]}
    four = {"apple": [D(i * 20, 0, i * 20 + 10, 10) for i in range(4)]}
    two = {"apple": [D(i * 20, 0, i * 20 + 10, 10) for i in range(2)]}
    assert evaluate_metadata(three, meta).correct
    r4 = evaluate_metadata(four, meta)
    assert (r4.correct, r4.satisfied, r4.total) == (False, 1, 2)
    r2 = evaluate_metadata(two, meta)
    assert (r2.correct, r2.satisfied) == (False, 1)  # include fails, exclude holds


def test_colors_use_the_most_confident_objects():
    calls = []

    def colors(objs, cls):
        calls.append((len(objs), cls))
        return ["red" if o.score > 0.9 else "blue" for o in objs]

    det = {"car": [D(0, 0, 10, 10, 0.99), D(20, 0, 30, 10, 0.5)]}
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert evaluate_metadata(det, meta, colors).correct
    assert calls == [(1, "car")]  # only the top `count` objects are classified
    meta_blue = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}]}
    assert not evaluate_metadata(det, meta_blue, colors).correct


def test_position_against_target_group_and_colour_attribution():
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    ok = {"dog": [D(80, 45, 90, 55)], "cat": [D(10, 45, 20, 55)]}
    bad = {"dog": [D(10, 45, 20, 55)], "cat": [D(80, 45, 90, 55)]}
    assert evaluate_metadata(ok, meta).correct
    r = evaluate_metadata(bad, meta)
    assert not r.correct and "found right of target" in r.reasons[0]
    # the target clause failed → "no target"
    r = evaluate_metadata({"cat": [D(10, 45, 20, 55)]}, meta)
    assert (r.correct, r.satisfied) == (False, 0) and "no target" in r.reasons[-1]
    attr = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "yellow"}, {"class": "bench", "count": 1, "color": "green"}]}
    fn = lambda objs, cls: ["yellow" if cls == "bus" else "red" for _ in objs]  # noqa: E731
    r = evaluate_metadata({"bus": [D(0, 0, 5, 5)], "bench": [D(9, 9, 19, 19)]}, attr, fn)
    assert (r.correct, r.satisfied, r.total) == (False, 1, 2)


def test_summary_is_mean_over_tags():
    correct = [1, 0, 1, 1, 0, 0]
    tags = ["single_object", "single_object", "counting", "counting", "counting", "colors"]
    s = geneval_summary(correct, tags, prompt_ids=[0, 0, 1, 1, 2, 3])
    assert s["tags"]["single_object"] == (0.5, 1, 2)
    assert s["tags"]["counting"][0] == pytest.approx(2 / 3)
    assert s["overall"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)  # not the image mean 0.5
    assert s["correct_images"] == pytest.approx(0.5)
    assert s["correct_prompts"] == pytest.approx(0.5)  # prompts 0 and 1 have a correct image
    text = format_geneval_summary(s)
    assert "counting         = 66.67% (2 / 3)" in text and "Overall score (avg. over tasks): 0.38889" in text


def test_instance_postprocessing_matches_mmdet_rule():
    # 2 queries, 3 classes (+ no-object); query 0 = class 1 with a 2×3 mask at rows 1-2, cols 2-4
    cls = torch.full((2, 4), -10.0)
    cls[0, 1], cls[0, 3] = 5.0, 0.0
    cls[1, 3] = 5.0
    masks = torch.full((2, 6, 8), -20.0)
    masks[0, 1:3, 2:5] = 20.0
    out = instance_detections(cls, masks, max_per_image=1)
    label, score, box, mask = out[0]
    p = torch.tensor([-10.0, 5.0, -10.0, 0.0]).softmax(0)[1]
    assert label == 1 and box == (2.0, 1.0, 5.0, 3.0) and mask.sum() == 6
    assert score == pytest.approx(float(p) * float(torch.sigmoid(torch.tensor(20.0))), rel=1e-6)


# ------------------------------------------------------------------------------ geneval plumbing
@pytest.fixture(scope="module")
def geneval_models(tmp_path_factory):
    from fixtures_rewards import tiny_geneval_models

    return tiny_geneval_models(tmp_path_factory.mktemp("geneval"))


def test_geneval_reward_end_to_end_tiny(geneval_models):
    from flowrl.rewards import build_rewards

    det, clip = geneval_models
    rs = build_rewards({"geneval": {"weight": 1.0, "detector_path": det, "clip_path": clip}})
    reward = rs.rewards["geneval"]
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    found = reward.models.detect((images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert sum(map(len, found.values())) == 100 and all(d.mask.shape == (48, 64) for d in found["dog"])  # the top 100 (query, class) pairs
    kept = keep_detections(found, threshold=0.3)
    assert set(kept) == {"dog"}  # every other class has probability ~e^-40
    n_dogs = len(kept["dog"])
    rows = [
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "exclude": []},
        {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]},
    ]
    meta = {"metadata": rows}
    table, names = rs.score(images, ["a photo of a dog", "a photo of a dog and a cat"], meta)
    assert names == ["geneval/strict", "geneval/partial"]
    assert n_dogs >= 1
    assert table[:, 0].tolist() == [1.0, 0.0] and table[:, 1].tolist() == [1.0, 0.5]
    # colour: the classifier names one of GenEval's colours for a kept dog
    color = reward.models.classify_colors((images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), found["dog"][:1], "dog")
    assert len(color) == 1 and color[0] in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
    with pytest.raises(ValueError, match="needs GenEval metadata"):
        reward(images, ["x", "y"], None)


def test_geneval_rejects_a_detector_without_coco_classes(tmp_path, geneval_models):
    from transformers import AutoConfig

    from flowrl.rewards.geneval import GenEvalModels

    det, clip = geneval_models
    cfg = AutoConfig.from_pretrained(det)
    cfg.id2label = {i: str(i) for i in range(3)}
    cfg.label2id = {str(i): i for i in range(3)}
    cfg.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="has 3 classes; GenEval needs a COCO-instance model with 80"):
        GenEvalModels(str(tmp_path), clip)
    assert len(CLASSNAMES) == 80


# ------------------------------------------------------------------------------ OCR
def test_ocr_definition_hand_computed():
    assert quoted_target('A neon sign that says "Open 24 Hours" at night') == "Open 24 Hours"
    with pytest.raises(ValueError, match="double quotes"):
        quoted_target("no quotes here")
    assert levenshtein("kitten", "sitting") == 3
    assert ocr_score("OPEN 24 hours", "Open 24 Hours") == 1.0  # case and spaces ignored
    assert ocr_score("the sign reads open24hours!", "Open 24 Hours") == 1.0  # target inside → d = 0
    assert ocr_score("opem", "open") == pytest.approx(0.75)  # one substitution over 4
    assert ocr_score("", "open") == 0.0  # d = 4 = |t|
    assert ocr_score("xxxxxxxxxxxxxxxx", "ab") == 0.0  # d capped at |t|
    assert ocr_score("helo", "hello") == pytest.approx(0.8)


def _tiny_trocr(root):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrOCRConfig, TrOCRProcessor, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 ")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    enc = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    dec = TrOCRConfig(vocab_size=len(vocab), d_model=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=37, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
    model = VisionEncoderDecoderModel(cfg).eval()
    gc = model.generation_config
    gc.decoder_start_token_id, gc.pad_token_id, gc.eos_token_id = 1, 0, 2
    with torch.no_grad():  # the decoder's last hidden state is a constant → it reads "a" at every step
        ln = model.decoder.model.decoder.layers[-1].final_layer_norm
        ln.weight.zero_()
        ln.bias.copy_(torch.linspace(-1, 1, 32))
        w = model.decoder.output_projection.weight
        w.zero_()
        w[vocab["a"]] = ln.bias * 10
    model.save_pretrained(str(root))
    TrOCRProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(str(root))
    return str(root)


def test_ocr_reward_with_a_tiny_trocr(tmp_path):
    from flowrl.rewards import build_rewards

    path = _tiny_trocr(tmp_path / "ocr")
    rs = build_rewards({"ocr": {"weight": 1.0, "path": path, "max_new_tokens": 6}})
    images = torch.rand(3, 3, 40, 50, generator=torch.Generator().manual_seed(1))
    table, names = rs.score(images, ['a sign "aaa"', 'a sign "b"', 'a sign "aaaaaab"'], None)
    assert rs.rewards["ocr"].last_text == ["aaaaaa"] * 3
    # "aaa" inside "aaaaaa" → 1; "b": d = min(6, 1) = 1 → 0; "aaaaaab" vs "aaaaaa": d = 1 → 1 − 1/7
    assert names == ["ocr"] and table[:, 0].tolist() == pytest.approx([1.0, 0.0, 1 - 1 / 7])
    video = images[:2, None].expand(2, 2, 3, 40, 50)
    assert rs.rewards["ocr"](video, ['"aaa"', '"b"']).tolist() == pytest.approx([1.0, 0.0])
    json.dumps(names)


# ------------------------------------------------------------------------------ flowrl eval --benchmark
def test_benchmark_tables_from_an_eval_result():
    from flowrl import runs
    from flowrl.benchmarks import geneval_table, ocr_table

    # 3 prompts × 2 samples: single_object 1/2, counting 2/2 + 0/2 → counting 2/4; overall (0.5 + 0.5)/2
    table = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [0.0]])
    meta = [{"tag": "single_object"}, {"tag": "counting"}, {"tag": "counting"}]
    result = runs.EvalResult(weights=runs.Weights("base"), summary={}, table=table, names=["geneval/strict"], prompts=["a", "b", "c"], metadata=meta, samples_per_prompt=2)
    text = geneval_table(result, "geneval/strict")
    assert "single_object    = 50.00% (1 / 2)" in text and "counting         = 50.00% (2 / 4)" in text
    assert "% correct prompts: 66.67%" in text and "Overall score (avg. over tasks): 0.50000" in text
    result.names = ["ocr"]
    result.metadata = [{"category": "x"}, {"category": "y"}, {"category": "y"}]
    text = ocr_table(result, "ocr")
    assert "% read exactly: 50.00%" in text and "y                = 0.5000 (4 images)" in text


def test_flowrl_eval_benchmark_geneval_on_digits(tmp_path, geneval_models, capsys):
    from pathlib import Path

    from flowrl.cli import main

    config = Path(__file__).resolve().parents[1] / "assets" / "configs" / "digits.yaml"
    rows = [
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
        {"tag": "counting", "include": [{"class": "dog", "count": 9}], "exclude": [{"class": "dog", "count": 10}], "prompt": "a photo of nine dogs"},
    ]
    prompts = tmp_path / "evaluation_metadata.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    det, clip = geneval_models
    args = ["eval", "--config", str(config), "--base", "--samples-per-prompt", "1", "--out", str(tmp_path / "eval.json"), "--prompts", str(prompts)]
    assert main(args + ["--benchmark", "geneval"]) == 2  # the config's rewards lack geneval
    assert "reads the reward 'geneval'" in capsys.readouterr().err
    rewards = json.dumps({"geneval": {"weight": 1.0, "detector_path": det, "clip_path": clip}})
    assert main(args + ["--benchmark", "geneval", "--set", f"reward.rewards={rewards}"]) == 0
    out = capsys.readouterr().out
    # the tiny detector sees at least one certain "dog" everywhere and at most 6 (its queries): single 1/1, counting 0/1
    assert "single_object    = 100.00% (1 / 1)" in out and "counting         = 0.00% (0 / 1)" in out
    assert "Overall score (avg. over tasks): 0.50000" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["benchmark"]["name"] == "geneval" and report["category_column"] == "tag"

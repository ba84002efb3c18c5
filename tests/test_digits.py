"""Digits miniature: prompt grammar and splits, the judge, the pipeline and its pretraining.

Mirrors ``flowrl/digits_data.py``, ``rewards/digits.py``, ``pipelines/digits.py`` and
``flowrl/pretrain_digits.py``. Everything runs on CPU in a few seconds per test.
"""

from __future__ import annotations

import json

import pytest
import torch

from flowrl.digits_data import (
    BLANK,
    CANVAS,
    SceneRenderer,
    all_prompts,
    layouts,
    load_digit_images,
    parse_prompt,
    prompt_split,
    split_cells,
)
from flowrl.paths import assets_dir


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def judge():
    from flowrl.rewards.digits import DigitsJudge

    return DigitsJudge()


# -- data: grammar, layouts, splits ------------------------------------------------------------


def test_grammar_round_trips_and_rejects_unknown_prompts():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 10 + 10 + 90 + 90
    for p in prompts:
        assert parse_prompt(p).text == p
    assert parse_prompt("  A 3  Left of a 7 ").digits == (3, 7)
    with pytest.raises(ValueError, match="grammar"):
        parse_prompt("a cat")
    with pytest.raises(ValueError, match="two different digits"):
        parse_prompt("a 3 left of a 3")


def test_layouts_of_each_kind():
    # 2×2 cells, row-major: 0 TL, 1 TR, 2 BL, 3 BR
    assert len(layouts("a 3")) == 4  # any one cell
    assert len(layouts("two 5s")) == 6  # C(4, 2)
    left = layouts("a 3 left of a 7")
    assert len(left) == 4  # 3 in column 0 (2 rows) × 7 in column 1 (2 rows)
    assert (3, 7, BLANK, BLANK) in left and (3, BLANK, BLANK, 7) in left and (7, 3, BLANK, BLANK) not in left
    above = layouts("a 9 above a 1")
    assert (9, BLANK, 1, BLANK) in above and (BLANK, 9, 1, BLANK) in above and (1, BLANK, 9, BLANK) not in above


def test_prompt_splits_are_disjoint_and_every_role_is_seen_in_pretraining():
    held, pre = prompt_split("heldout"), prompt_split("pretrain")
    assert len(held) == 50 and len(pre) == 150
    assert not set(held) & set(pre) and sorted(held + pre) == sorted(all_prompts())
    specs = [parse_prompt(p) for p in pre]
    for kind in ("left", "above"):
        firsts = {s.digits[0] for s in specs if s.kind == kind}
        seconds = {s.digits[1] for s in specs if s.kind == kind}
        assert firsts == seconds == set(range(10))
    assert {s.digits[0] for s in specs if s.kind == "single"} == set(range(10))
    # an ordered pair is held out for one relation at most
    held_specs = [parse_prompt(p) for p in held]
    left = {s.digits for s in held_specs if s.kind == "left"}
    above = {s.digits for s in held_specs if s.kind == "above"}
    assert not left & above


def test_rl_and_eval_halves_split_the_heldout_prompts_by_category():
    import json
    from collections import Counter

    from flowrl.digits_data import category
    from flowrl.paths import assets_dir

    rl, ev, held = prompt_split("rl"), prompt_split("eval"), prompt_split("heldout")
    assert not set(rl) & set(ev) and sorted(rl + ev) == sorted(held)  # RL never trains on an eval prompt
    assert not set(ev) & set(prompt_split("pretrain"))  # nor did pretraining
    kinds = lambda ps: Counter(parse_prompt(p).kind for p in ps)  # noqa: E731
    assert kinds(rl) == kinds(ev) == Counter({"left": 12, "above": 12, "count": 1})
    assert {category(p) for p in ev} == {"count", "position"} and category("a 3") == "single"
    assert prompt_split("eval") == ev  # fixed (seeded), the same every call
    # the shipped base model's record (16 samples per prompt): the halves are equally hard for it
    splits = json.loads((assets_dir() / "digits" / "pipeline" / "heldout_eval.json").read_text())["splits"]
    assert splits["rl"]["n"] == splits["eval"]["n"] == 25 * 16
    assert abs(splits["rl"]["correct"] - splits["eval"]["correct"]) < 0.05  # measured 0.527 vs 0.515


def test_digit_image_split_is_stratified_and_disjoint():
    tr_x, tr_y = load_digit_images("train")
    ho_x, ho_y = load_digit_images("heldout")
    assert len(tr_y) + len(ho_y) == 1797
    assert tr_x.shape[1:] == (8, 8) and float(tr_x.max()) == 1.0 and float(tr_x.min()) == 0.0
    assert torch.bincount(ho_y, minlength=10).min() >= 34  # ~20 % of ≥ 174 per digit
    # no held-out image appears in the train split
    assert not (ho_x.reshape(len(ho_y), 1, 64) == tr_x.reshape(1, len(tr_y), 64)).all(-1).any()


def test_rendered_scenes_follow_a_layout_and_are_seeded():
    r = SceneRenderer("train")
    prompts = ["a 3 left of a 7", "two 5s", "a 9 above a 1", "a 0"]
    a = r.render(prompts, torch.Generator().manual_seed(3))
    b = r.render(prompts, torch.Generator().manual_seed(3))
    assert a.shape == (4, 1, CANVAS, CANVAS) and torch.equal(a, b)
    cells = split_cells(a)  # [4, 4, 8, 8]
    nonblank = cells.flatten(2).amax(-1) > 0
    assert nonblank.sum(1).tolist() == [2, 2, 2, 1]


# -- the judge -----------------------------------------------------------------------------------


def test_shipped_classifier_heldout_accuracy(judge):
    from flowrl.rewards.digits import classifier_accuracy

    acc = classifier_accuracy(judge.classifier, "heldout")
    assert acc >= 0.95, f"held-out digit accuracy {acc:.4f} < 0.95"
    cfg = json.loads((assets_dir() / "digits" / "judge" / "config.json").read_text())
    assert abs(cfg["heldout_accuracy"] - acc) < 1e-3  # the recorded number is the real one
    blanks = torch.zeros(8, 8, 8)
    assert (judge.classifier(blanks).argmax(-1) == BLANK).all()


def test_judge_accepts_matching_scenes_of_heldout_digits(judge):
    r = SceneRenderer("heldout")
    prompts = all_prompts()
    images = r.render(prompts, torch.Generator().manual_seed(0))
    out = judge(images, prompts)
    assert set(out) == {"correct", "prob"} and out["correct"].shape == out["prob"].shape == (200,)
    # two digits at ~99 % each: ≥ 95 % of scenes judged correct
    assert out["correct"].mean() >= 0.95
    assert ((out["prob"] >= 0) & (out["prob"] <= 1)).all() and out["prob"].mean() >= 0.9


def test_judge_rejects_mismatching_scenes(judge):
    r = SceneRenderer("heldout")
    prompts = all_prompts()
    images = r.render(prompts, torch.Generator().manual_seed(1))
    shifted = prompts[7:] + prompts[:7]  # every scene paired with another prompt
    out = judge(images, shifted)
    assert out["correct"].sum() <= 2 and out["prob"].mean() < 0.02


def test_judge_hand_built_scenes(judge):
    x, y = load_digit_images("heldout")
    img = {d: x[(y == d).nonzero()[0, 0]] for d in (3, 7)}

    def scene(tl=None, tr=None, bl=None, br=None):
        s = torch.zeros(1, 1, 16, 16)
        for d, (r, c) in zip((tl, tr, bl, br), ((0, 0), (0, 8), (8, 0), (8, 8))):
            if d is not None:
                s[0, 0, r : r + 8, c : c + 8] = img[d]
        return s

    cases = [  # (scene, prompt, expected correct)
        (scene(tl=3, tr=7), "a 3 left of a 7", 1),
        (scene(bl=3, tr=7), "a 3 left of a 7", 1),  # rows free
        (scene(tl=7, tr=3), "a 3 left of a 7", 0),  # swapped
        (scene(tl=3, bl=7), "a 3 left of a 7", 0),  # same column
        (scene(tl=3, bl=7), "a 3 above a 7", 1),
        (scene(tl=3, tr=7, br=7), "a 3 left of a 7", 0),  # an extra digit
        (scene(tr=7), "a 7", 1),
        (scene(tr=7, bl=7), "two 7s", 1),
        (scene(tr=7), "two 7s", 0),
        (scene(), "a 3", 0),
    ]
    images = torch.cat([c[0] for c in cases])
    out = judge(images, [c[1] for c in cases])
    assert out["correct"].tolist() == [float(c[2]) for c in cases]
    assert (out["prob"][out["correct"] == 1] > 0.5).all() and (out["prob"][out["correct"] == 0] < 0.5).all()
    assert judge.describe(images[:1]) == ["3 7 / . ."]


def test_judge_is_the_registered_digits_reward():
    import flowrl.rewards as rewards
    import flowrl.rewards.digits  # noqa: F401  (registers "digits")

    soft = rewards.get("digits")
    assert soft.component_weights == {"correct": 0.0, "prob": 1.0}
    hard = rewards.get("digits", component="correct")
    assert hard.component_weights == {"correct": 1.0, "prob": 0.0}
    with pytest.raises((ValueError, TypeError), match="component"):
        rewards.get("digits", component="nope")
    images = SceneRenderer("heldout").render(["a 1", "two 2s"], torch.Generator().manual_seed(0))
    assert torch.equal(hard.score(images, ["a 1", "two 2s"]), hard(images, ["a 1", "two 2s"])["correct"])


# -- the pipeline ------------------------------------------------------------------------------

TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, text_hidden_size=16, text_layers=1)


def test_tokenizer_is_word_level_for_the_grammar():
    from flowrl.pipelines.digits import build_tokenizer

    tok = build_tokenizer()
    toks = tok.convert_ids_to_tokens(tok("a 3 left of a 7").input_ids)
    assert toks == ["<|startoftext|>", "a</w>", "3</w>", "left</w>", "of</w>", "a</w>", "7</w>", "<|endoftext|>"]
    assert tok.convert_ids_to_tokens(tok("two 5s").input_ids)[1:4] == ["two</w>", "5</w>", "s</w>"]


def test_pipeline_round_trips_with_identical_outputs(tmp_path):
    from flowrl.pipelines.digits import DigitsPipeline, build_digits_pipeline

    pipe = build_digits_pipeline(**TINY, seed=1)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a 3 left of a 7", "two 5s", "a 9 above a 1"]
    for gs in (1.0, 3.0):
        a = pipe(prompts, num_inference_steps=4, guidance_scale=gs, generator=torch.Generator().manual_seed(0)).images
        pipe.save_pretrained(tmp_path)
        loaded = DigitsPipeline.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        b = loaded(prompts, num_inference_steps=4, guidance_scale=gs, generator=torch.Generator().manual_seed(0)).images
        assert a.shape == (3, 1, 16, 16) and 0 <= float(a.min()) and float(a.max()) <= 1
        assert torch.equal(a, b)
    assert type(loaded.tokenizer).__name__ == "CLIPTokenizer"
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "DigitsPipeline"


def test_adapter_contract_and_flow_policy():
    from flowrl.pipelines.base import adapter_for
    from flowrl.pipelines.digits import DigitsAdapter, build_digits_pipeline

    pipe = build_digits_pipeline(**TINY)
    ad = adapter_for(pipe)
    assert isinstance(ad, DigitsAdapter) and ad.default_size == (16, 16)
    s = ad.sigmas(8, height=16, width=16)
    assert s.dtype == torch.float32 and s.shape == (9,) and s[0] == 1 and s[-1] == 0 and (s.diff() < 0).all()
    x = ad.initial_noise(5, height=16, width=16, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 16, 16)
    cond = ad.encode_prompts(["a 1"] * 5, guidance_scale=4.0)
    assert {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"} <= set(cond)
    assert all(v.shape[0] == 5 for v in cond.values())
    with torch.no_grad():
        v1 = ad.velocity(x, s[:1].expand(5), cond, guidance_scale=1.0, height=16, width=16)
        v4 = ad.velocity(x, s[:1].expand(5), cond, guidance_scale=4.0, height=16, width=16)
        vu = pipe.predict_velocity(x, s[:1].expand(5), cond["negative_prompt_embeds"], cond["negative_pooled_prompt_embeds"])
    torch.testing.assert_close(v4, vu + 4.0 * (v1 - vu), rtol=1e-4, atol=1e-5)  # CFG formula
    # the pipeline's own Euler loop equals the adapter's x + (σ' − σ)·v
    with torch.no_grad():
        cond1 = ad.encode_prompts(["a 1"] * 5, guidance_scale=1.0)
        lat = x.clone()
        for i in range(4):
            sig = ad.sigmas(4, height=16, width=16)
            lat = lat + (sig[i + 1] - sig[i]) * ad.velocity(lat, sig[i].expand(5), cond1, guidance_scale=1.0, height=16, width=16)
        ref = pipe(["a 1"] * 5, num_inference_steps=4, latents=x).images
    torch.testing.assert_close(ad.decode(lat, height=16, width=16), ref, rtol=0, atol=1e-5)

    from flowrl.pipelines.flow_policy import FlowPolicy

    policy = FlowPolicy(pipe, num_steps=4)
    traj = policy.rollout(["a 1", "two 2s"], group_size=2, generator=torch.Generator().manual_seed(0))
    assert traj.outputs.shape == (4, 1, 16, 16)


# -- pretraining -------------------------------------------------------------------------------


def test_shortened_pretraining_saves_a_loadable_reproducible_pipeline(tmp_path):
    from flowrl.pipelines.digits import DigitsPipeline
    from flowrl.pretrain_digits import pretrain_digits

    a = pretrain_digits(tmp_path / "a", seed=3, steps=3, batch_size=8, log_every=0, **TINY)
    b = pretrain_digits(None, seed=3, steps=3, batch_size=8, log_every=0, **TINY)
    for (name, pa), pb in zip(a.transformer.state_dict().items(), b.transformer.state_dict().values()):
        assert torch.equal(pa, pb), f"pretraining is not reproducible from its seed: {name} differs"
    init = pretrain_digits(None, seed=3, steps=0, batch_size=8, log_every=0, **TINY)
    assert any(not torch.equal(p, q) for p, q in zip(a.transformer.parameters(), init.transformer.parameters()))
    loaded = DigitsPipeline.from_pretrained(tmp_path / "a")
    loaded.set_progress_bar_config(disable=True)
    out = loaded(["a 3"], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    ref = a(["a 3"], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(out, ref)
    assert json.loads((tmp_path / "a" / "pretrain_config.json").read_text())["steps"] == 3


# -- the shipped base model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_pipe():
    from flowrl.pipelines.digits import load_default_digits_pipeline

    return load_default_digits_pipeline()


def test_shipped_pipeline_is_small_and_fast(base_pipe):
    size = sum(f.stat().st_size for f in (assets_dir() / "digits").rglob("*") if f.is_file())
    assert size <= 10 * 2**20, f"assets/digits is {size / 2**20:.1f} MB > 10 MB"
    # fast, measured without a clock (a wall-clock bound fails on a slower or busier machine): under a
    # million parameters in all (measured: 587,152 transformer + 75,136 text encoder), 16×16 outputs
    n_params = sum(p.numel() for c in base_pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters())
    assert n_params < 1_000_000, n_params
    images = base_pipe(["a 3 left of a 7"] * 32, num_inference_steps=8, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (32, 1, 16, 16)


def test_shipped_pipeline_leaves_room_for_rl(base_pipe, judge):
    from flowrl.pretrain_digits import EVAL_GUIDANCE, EVAL_STEPS, evaluate_correctness

    # GenEval-style held-out score with the RL job's sampler (8 Euler steps, no CFG): 20–70 %
    held = evaluate_correctness(base_pipe, prompt_split("heldout"), judge, samples_per_prompt=4, seed=0)
    assert 0.2 <= held["correct"] <= 0.7, held
    recorded = json.loads((assets_dir() / "digits" / "pipeline" / "heldout_eval.json").read_text())
    assert (recorded["num_inference_steps"], recorded["guidance_scale"]) == (EVAL_STEPS, EVAL_GUIDANCE)
    assert abs(recorded["correct"] - held["correct"]) < 0.1  # 800 vs 200 samples of the same model

"""Image-conditioned prompt rows: ``image`` paths resolve against the prompt file, are checked before
any model loads, travel with the prompt (``ImagePrompt``) and reach rewards in ``meta``."""

import json
import pickle

import pytest
import torch

from flowrl.prompts import ImagePrompt, load_prompt_set, load_source_images, prompt_images, reward_meta


def _png(path, color=(255, 0, 0), size=(8, 8)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_image_paths_resolve_against_the_prompt_file(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _png(data / "imgs" / "a.png")
    _png(data / "imgs" / "b.png", (0, 255, 0))
    rows = [
        {"prompt": "make it blue", "image": "imgs/a.png"},
        {"prompt": "make it blue", "image": "imgs/b.png"},
        {"prompt": "combine", "image": ["imgs/a.png", "imgs/b.png"], "answer": 1},
        {"prompt": "no image"},
    ]
    f = data / "edits.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.chdir(tmp_path)  # not the prompt file's folder
    ps = load_prompt_set(str(f))
    a, b = str((data / "imgs" / "a.png").resolve()), str((data / "imgs" / "b.png").resolve())
    assert prompt_images(ps.prompts[0]) == (a,) and prompt_images(ps.prompts[2]) == (a, b)
    assert type(ps.prompts[3]) is str and prompt_images(ps.prompts[3]) == ()
    assert ps.metadata[0]["image"] == a and ps.metadata[2]["image"] == [a, b] and ps.metadata[2]["answer"] == 1
    # same text, another image: another prompt (group identity, cache keys); still the same string
    assert ps.prompts[0] != ps.prompts[1] and len({ps.prompts[0], ps.prompts[1]}) == 2
    assert str(ps.prompts[0]) == str(ps.prompts[1]) == "make it blue"
    assert ps.prompts[0] != "make it blue" and "make it blue" != ps.prompts[0]
    assert ps.prompts[0] == ImagePrompt("make it blue", [a])
    # rewards receive the resolved paths; each process can load them
    meta = reward_meta(ps.metadata)
    assert meta["image"] == [a, b, [a, b], None]
    img = load_source_images(meta["image"][1])
    assert img.size == (8, 8) and img.getpixel((0, 0)) == (0, 255, 0)
    # pickles with its images (multi-process gathers)
    back = pickle.loads(pickle.dumps(ps.prompts[2]))
    assert back == ps.prompts[2] and back.images == (a, b)


def test_missing_image_is_one_error_naming_row_and_path(tmp_path):
    _png(tmp_path / "ok.png")
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "x", "image": "ok.png"}) + "\n" + json.dumps({"prompt": "y", "image": ["ok.png", "gone.png"]}))
    with pytest.raises(ValueError, match=r"train.prompts: .*p.jsonl: row 1: image 'gone.png' not found"):
        load_prompt_set(str(f))
    with pytest.raises(ValueError, match=r"row 0: 'image' holds int"):
        load_prompt_set([{"prompt": "x", "image": 3}])


def test_config_rows_resolve_images_against_the_config_file(tmp_path, monkeypatch):
    from flowrl import TrainConfig

    _png(tmp_path / "cfg" / "src.png")
    (tmp_path / "cfg" / "c.yaml").write_text("train:\n  prompts:\n    - {prompt: edit it, image: src.png}\n")
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig.from_yaml(tmp_path / "cfg" / "c.yaml")
    ps = load_prompt_set(cfg.train.prompts)
    assert prompt_images(ps.prompts[0]) == (str((tmp_path / "cfg" / "src.png").resolve()),)


def test_prompt_cache_keys_include_the_image(tmp_path):
    """The text-encoder cache holds one entry per (text, images): a cached row of one image is
    never served for another."""
    from flowrl.pipelines.tiny import tiny_sd3_pipeline
    from flowrl import FlowPolicy

    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    pol = FlowPolicy(tiny_sd3_pipeline(), num_steps=2)
    p1, p2 = ImagePrompt("a cat", [str(a)]), ImagePrompt("a cat", [str(b)])
    pol.encode([p1, p2])
    assert len(pol.adapter._prompt_cache) == 2
    pol.encode(["a cat", p1])
    assert len(pol.adapter._prompt_cache) == 3

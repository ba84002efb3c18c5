"""Built-in model rewards at tiny random config, saved and loaded through the real loaders, and
tensor preprocessing parity with the reference processors on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from fixtures_rewards import (  # noqa: E402
    CLIP_H_PROCESSOR,
    clip_tokenizer,
    register_tiny_openclip,
    sample_images,
    tiny_hf_clip_dir,
)

from flowrl.rewards import build_rewards, get  # noqa: E402
from flowrl.rewards.preprocess import clip_preprocess, longest_pad_preprocess  # noqa: E402
from tests._tolerance import float32_sum_tol  # noqa: E402

# PIL bicubic (a=-0.5, uint8 output) vs torch antialiased bicubic (a=-0.75, float output): on the
# two sklearn photos the mean |diff| is ~4e-3 in normalised units (mostly the reference's uint8
# rounding, 1/255/0.27 ≈ 0.007 max) and the max |diff| ~0.05 at sharp edges.
MEAN_TOL, MAX_TOL = 6e-3, 0.06


def _pil_and_tensor(h, w, seed=0):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def photos():
    return sample_images()


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    return tiny_hf_clip_dir(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def oc_name(tmp_path_factory):
    return register_tiny_openclip(tmp_path_factory.mktemp("oc_cfg"))


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_clip_preprocess_matches_transformers_on_photos(photos, backend):
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = (CLIPImageProcessorPil if backend == "pil" else CLIPImageProcessor)(**CLIP_H_PROCESSOR)
    for pil, x in zip(*photos):
        ref = proc(images=pil, return_tensors="pt").pixel_values
        mine = clip_preprocess(x, crop="floor")
        assert mine.shape == ref.shape == (1, 3, 224, 224)
        d = (mine - ref).abs()
        assert d.mean() < MEAN_TOL and d.max() < MAX_TOL, (d.mean(), d.max())


def test_clip_preprocess_matches_open_clip_on_photos(photos):
    import open_clip

    shortest = open_clip.image_transform(224, is_train=False)
    longest = open_clip.image_transform(224, is_train=False, resize_mode="longest")  # = HPSv2 ResizeMaxSize
    for pil, x in zip(*photos):
        for mine, ref in ((clip_preprocess(x, crop="round"), shortest(pil)), (longest_pad_preprocess(x), longest(pil))):
            d = (mine - ref[None]).abs()
            assert d.mean() < MEAN_TOL and d.max() < MAX_TOL, (d.mean(), d.max())


def test_crop_and_pad_geometry_is_exact_without_resampling():
    """224×303 needs no resize: only crop offsets and normalisation remain, which must match to
    float precision (79 px to drop: transformers starts at 79//2 = 39, torchvision at round(39.5) = 40)."""
    import open_clip
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pil, x = _pil_and_tensor(224, 303)
    ref_hf = CLIPImageProcessorPil(**CLIP_H_PROCESSOR)(images=pil, return_tensors="pt").pixel_values
    assert torch.allclose(clip_preprocess(x, crop="floor"), ref_hf, atol=1e-5)
    ref_oc = open_clip.image_transform(224, is_train=False)(pil)[None]
    assert torch.allclose(clip_preprocess(x, crop="round"), ref_oc, atol=1e-5)
    assert not torch.allclose(clip_preprocess(x, crop="floor"), ref_oc, atol=1e-3)  # the offsets differ
    # longest side already 224: HPS pads 64 rows of black (32 top, 32 bottom) before normalising
    pil, x = _pil_and_tensor(160, 224, seed=1)
    ref = open_clip.image_transform(224, is_train=False, resize_mode="longest")(pil)[None]
    assert torch.allclose(longest_pad_preprocess(x), ref, atol=1e-5)


def test_real_clip_bpe_tokenizer_matches_open_clip():
    import open_clip

    tok, oc = clip_tokenizer(), open_clip.get_tokenizer("ViT-H-14")
    assert len(tok) == 49408
    for p in ["A photo of a Cat, sitting!", "an astronaut riding a horse on mars"]:
        ref = oc([p])[0]
        assert tok(p).input_ids == ref[ref.nonzero()].flatten().tolist()


# ----------------------------------------------------------------------------- transformers CLIP family


def _hf_reference(path, pils, prompts):
    """Reference: the stock CLIP processor (PIL backend) + CLIPModel forward."""
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(path).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(path)(images=pils, return_tensors="pt").pixel_values
    tok = clip_tokenizer()(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels)
    return out.logits_per_image.diag(), model.logit_scale.exp().item(), out


def test_pickscore_equals_reference_logits(hf_clip):
    pils, xs = zip(*[_pil_and_tensor(224, 224, seed=s) for s in range(3)])
    prompts = ["a cat", "a dog on the moon", "an oil painting of a red fox"]
    ref, logit_scale, _ = _hf_reference(hf_clip, list(pils), prompts)
    r = get("pickscore", path=hf_clip, processor_path=hf_clip)
    x = torch.cat(xs)
    with torch.no_grad():
        s = r(x, prompts)
        s26 = get("pickscore", path=hf_clip, processor_path=hf_clip, normalize=True)(x, prompts)
    # PickScore = logit_scale.exp()·cos = CLIP's logits_per_image diagonal
    assert torch.allclose(s, ref, atol=1e-4)
    assert torch.allclose(s26, ref / 26, atol=1e-5)
    assert logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # CLIP init: logit_scale = log(1/0.07)


def test_pickscore_on_photos_within_preprocessing_tolerance(hf_clip, photos):
    pils, xs = photos
    prompts = ["chinese temple", "a flower"]
    ref, logit_scale, _ = _hf_reference(hf_clip, list(pils), prompts)
    with torch.no_grad():
        s = get("pickscore", path=hf_clip, processor_path=hf_clip)(torch.cat(xs), prompts)
    assert torch.allclose(s, ref, atol=0.02 * logit_scale / 14.3)  # cos within 0.02·(1/14.3) of reference


def test_clipscore_hf_cosine_and_video(hf_clip):
    pils, xs = zip(*[_pil_and_tensor(224, 224, seed=s) for s in range(2)])
    prompts = ["a cat", "a dog"]
    ref, logit_scale, _ = _hf_reference(hf_clip, list(pils), prompts)
    r = get("clipscore", path=hf_clip)
    x = torch.cat(xs)
    with torch.no_grad():
        s = r(x, prompts)
        video = r(torch.stack([x, x.flip(0)], dim=0), prompts)  # [B=2, F=2, C, H, W]
        per_frame = r(torch.cat([x, x.flip(0)]), [prompts[0]] * 2 + [prompts[1]] * 2)
    assert torch.allclose(s, ref / logit_scale, atol=1e-5)  # cos = logits / logit_scale
    assert s.abs().max() <= 1
    # the frames scored in another batch (other shapes): cosines ≤ 1 of embeddings whose entries are
    # float32 dot products over ≤ 512 features
    assert torch.allclose(video, per_frame.view(2, 2).mean(1), atol=float32_sum_tol(1.0, 512))


def test_aesthetic_head_and_embedding(tmp_path, hf_clip):
    from flowrl.rewards.aesthetic import AestheticMLP

    torch.manual_seed(0)
    head = AestheticMLP(16)
    # the real file sac+logos+ava1-l14-linearMSE.pth has exactly these keys
    assert sorted(head.state_dict()) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    torch.save(head.state_dict(), tmp_path / "head.pth")
    r = get("aesthetic", head_path=str(tmp_path / "head.pth"), clip_path=hf_clip)
    pils, xs = zip(*[_pil_and_tensor(224, 224, seed=s) for s in range(2)])
    _, _, out = _hf_reference(hf_clip, list(pils), ["", ""])
    emb = out.image_embeds  # projected image features, already L2-normalised by CLIPModel
    with torch.no_grad():
        ref = head.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
        s = r(torch.cat(xs), ["", ""])
    assert torch.allclose(s, ref, atol=1e-5)
    with pytest.raises(RuntimeError, match="projection_dim=16"):
        torch.save(AestheticMLP(768).state_dict(), tmp_path / "big.pth")
        get("aesthetic", head_path=str(tmp_path / "big.pth"), clip_path=hf_clip)


# ----------------------------------------------------------------------------- open_clip family


def test_hpsv2_checkpoint_roundtrip_and_reference(tmp_path, oc_name):
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(oc_name, pretrained=None, image_resize_mode="longest")
    # HPS_v2.1_compressed.pt layout: {"state_dict": ...}; DDP "module." prefixes are stripped on load
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "hps.pt")
    r = get("hpsv2", checkpoint=str(tmp_path / "hps.pt"), model_name=oc_name)
    (p1, x1), (p2, x2) = _pil_and_tensor(160, 224, seed=2), _pil_and_tensor(224, 200, seed=3)
    prompts = ["a cat", "a city at night"]
    tok = open_clip.get_tokenizer(oc_name)
    with torch.no_grad():
        img = model.eval().encode_image(torch.stack([preprocess(p1), preprocess(p2)]), normalize=True)
        txt = model.encode_text(tok(prompts), normalize=True)
        ref = (img @ txt.T).diag()
        s = torch.cat([r(x1, prompts[:1]), r(x2, prompts[1:])])
    assert torch.allclose(s, ref, atol=1e-5)


def test_openclip_score_from_checkpoint_file(tmp_path, oc_name, photos):
    import open_clip

    torch.manual_seed(1)
    model, _, preprocess = open_clip.create_model_and_transforms(oc_name, pretrained=None)
    torch.save(model.state_dict(), tmp_path / "oc.bin")
    r = get("clipscore_openclip", model_name=oc_name, pretrained=str(tmp_path / "oc.bin"))
    pil, x = _pil_and_tensor(224, 303, seed=4)
    tok = open_clip.get_tokenizer(oc_name)
    with torch.no_grad():
        ref = (model.eval().encode_image(preprocess(pil)[None], normalize=True) * model.encode_text(tok(["a boat"]), normalize=True)).sum(-1)
        assert torch.allclose(r(x, ["a boat"]), ref, atol=1e-5)
        pils, xs = photos
        ref = (model.encode_image(torch.stack([preprocess(p) for p in pils]), normalize=True) * model.encode_text(tok(["a", "b"]), normalize=True)).sum(-1)
        assert torch.allclose(r(torch.cat(xs), ["a", "b"]), ref, atol=5e-3)


# ----------------------------------------------------------------------------- through the config


def test_build_rewards_with_local_paths(hf_clip):
    rs = build_rewards(
        {"pickscore": {"weight": 1.0, "path": hf_clip, "processor_path": hf_clip, "batch_size": 2}, "clipscore": {"weight": 0.5, "path": hf_clip}, "jpeg_compressibility": 0.0}
    )
    x = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    prompts = ["a", "b", "c"]
    table, names = rs.score(x, prompts)
    assert names == ["pickscore", "clipscore", "jpeg_compressibility"]
    # PickScore of the same CLIP = logit_scale.exp()·clipscore
    scale = rs.rewards["pickscore"].clip.model.logit_scale.exp().item()
    assert torch.allclose(table[:, 0], scale * table[:, 1], atol=1e-4)
    assert torch.allclose(rs.combine(table, names), table[:, 0] + 0.5 * table[:, 1])
    with pytest.raises(OSError):
        get("pickscore", path=str(hf_clip) + "_missing", processor_path=hf_clip)  # never downloads

"""edit_consistency: cosine of a local CLIP / DINOv2's image features between each sample and its own
source image (from the prompt row's ``image``), against the stock processor + model."""

import pytest
import torch

from fixtures_rewards import tiny_hf_clip_dir


def tiny_dinov2_dir(root, *, size: int = 28, seed: int = 0) -> str:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=size, patch_size=7)).eval().save_pretrained(root)
    BitImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3).save_pretrained(root)
    return str(root)


def _sources(tmp_path, size):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(2, 3, size, size, generator=g) * 255).round() / 255  # exactly representable in a PNG
    paths = []
    for i, im in enumerate(imgs):
        p = tmp_path / f"src{i}.png"
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(p)
        paths.append(str(p))
    return imgs, paths


@pytest.mark.parametrize("backbone", ["clip", "dinov2"])
def test_edit_consistency_matches_stock_features(tmp_path, backbone):
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPModel, Dinov2Model

    from flowrl.rewards import get

    if backbone == "clip":
        path, size = tiny_hf_clip_dir(tmp_path / "m"), 224
    else:
        path, size = tiny_dinov2_dir(tmp_path / "m"), 28
    src, paths = _sources(tmp_path, size)
    reward = get("edit_consistency", path=path)
    # an unchanged image scores 1, each sample is paired with its own source
    same = reward(src, ["a", "b"], {"image": paths})
    assert torch.allclose(same, torch.ones(2), atol=1e-5)
    swapped = reward(src, ["a", "b"], {"image": paths[::-1]})
    assert (swapped < 0.999).all()
    # the number: stock processor (PIL) + stock model on the same pair; images at the processor's size,
    # so the two resamplers do not differ
    edited = (src.flip(-1) * 0.7 + 0.1)
    proc = AutoImageProcessor.from_pretrained(path)
    model = (CLIPModel if backbone == "clip" else Dinov2Model).from_pretrained(path).eval()

    def feat(pixels):
        with torch.no_grad():
            if backbone == "clip":
                f = model.get_image_features(pixel_values=pixels)
                f = f if isinstance(f, torch.Tensor) else f.pooler_output
            else:
                f = model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(f, dim=-1)

    pil = [Image.open(p).convert("RGB") for p in paths]
    expected = (feat(proc(images=list(edited), do_rescale=False, return_tensors="pt").pixel_values) * feat(proc(images=pil, return_tensors="pt").pixel_values)).sum(-1)
    got = reward(edited, ["a", "b"], {"image": paths})
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    # several references: the mean of their normalised features; video: the mean over frames
    both = reward(src[:1], ["a"], {"image": [paths]})
    f = feat(proc(images=pil, return_tensors="pt").pixel_values)
    assert torch.allclose(both, (f[0] * f.mean(0)).sum()[None], atol=1e-4)
    video = torch.stack([src[0], edited[0]])[None]  # [1, F=2, C, H, W]
    assert torch.allclose(reward(video, ["a"], {"image": paths[:1]}), (same[0] + got[0]) / 2, atol=1e-4)


def test_edit_consistency_errors(tmp_path):
    from flowrl.rewards import get

    with pytest.raises(ValueError, match="holds no config.json"):
        get("edit_consistency", path=str(tmp_path))
    path = tiny_dinov2_dir(tmp_path / "m")
    reward = get("edit_consistency", path=path)
    with pytest.raises(ValueError, match="give the prompt rows an 'image' column"):
        reward(torch.rand(2, 3, 28, 28), ["a", "b"], {"metadata": [{}, {}]})

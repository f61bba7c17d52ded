"""Teachers load from files the tests save themselves (untrained open_clip / timm / maelab models, small
configs) and give [B, L, C] patch features and the CLS attention; hub names fail naming the setting."""

from __future__ import annotations

import json

import pytest
import torch

from maelab.teachers import HubDownloadError, build_teacher, resample_tokens
from maelab.teachers.base import cls_attention_qkv

CLIP_KW = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
DINO_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
ENC_CFG = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, pretrained_text=False, **CLIP_KW)
    path = tmp_path_factory.mktemp("clip") / "clip_tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model.visual


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("vit_base_patch16_224.dino", pretrained=False, num_classes=0, **DINO_KW)
    path = tmp_path_factory.mktemp("dino") / "dino_tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return path, model


def encoder_file(tmp_path, cfg=ENC_CFG):
    from safetensors.torch import save_file

    from maelab.models.vit import build_encoder

    torch.manual_seed(2)
    enc = build_encoder(cfg)
    path = tmp_path / "encoder.safetensors"
    save_file(enc.state_dict(), str(path), metadata={"encoder_config": json.dumps(cfg)})
    return path, enc


def images(b=2, size=32):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_clip_teacher_loads_saved_file(clip_file):
    path, visual = clip_file
    teacher = build_teacher({"type": "clip", "weights": str(path), "model_kwargs": CLIP_KW})
    assert torch.equal(
        teacher.visual.conv1.weight, visual.conv1.weight
    )  # the file's weights, not a fresh init
    out = teacher(images(), attention_layer=-1)
    assert out.features.shape == (2, 16, 64) and out.grid == (4, 4)
    assert out.cls_attention.shape == (2, 16) and (out.cls_attention > 0).all()
    assert not any(p.requires_grad for p in teacher.parameters())
    # patch tokens are ln_post of the last block's output, as open_clip's own intermediates give them
    x = teacher.prepare(images())
    ref = visual.forward_intermediates(x, indices=[1], output_fmt="NLC", normalize_intermediates=True)
    torch.testing.assert_close(out.features, ref["image_intermediates"][0], atol=1e-5, rtol=1e-5)
    proj = build_teacher({"type": "clip", "weights": str(path), "model_kwargs": CLIP_KW, "projection": True})
    assert proj(images()).features.shape == (2, 16, 32)


def test_dino_teacher_loads_saved_file(dino_file):
    path, model = dino_file
    teacher = build_teacher({"type": "dino", "weights": str(path), "model_kwargs": DINO_KW})
    out = teacher(images(), attention_layer=0)
    assert out.features.shape == (2, 16, 64) and out.cls_attention.shape == (2, 16)
    with torch.no_grad():
        ref = model.forward_features(images())[:, 1:]  # DINO uses ImageNet stats: no renormalisation
    torch.testing.assert_close(out.features, ref, atol=1e-5, rtol=1e-5)


def test_cls_attention_matches_explicit_softmax(dino_file):
    _, model = dino_file
    blk = model.blocks[0]
    x = torch.randn(2, 17, 64)
    attn = blk.attn
    qkv = attn.qkv(x).reshape(2, 17, 3, 2, 32).permute(2, 0, 3, 1, 4)
    probs = ((qkv[0] @ qkv[1].transpose(-2, -1)) * 32**-0.5).softmax(-1)  # [B, h, N, N]
    want = probs[:, :, 0, 1:].mean(1)
    torch.testing.assert_close(cls_attention_qkv(attn, x), want, atol=1e-6, rtol=1e-5)


def test_maelab_teacher_and_attention(tmp_path):
    path, enc = encoder_file(tmp_path)
    teacher = build_teacher({"type": "maelab", "weights": str(path)})
    out = teacher(images(), attention_layer=1)
    with torch.no_grad():
        _, maps = enc.forward_attention(images(), None, [1])
        ref = enc.forward_features(images())[:, 1:]
    torch.testing.assert_close(out.features, ref)
    torch.testing.assert_close(out.cls_attention, maps[1][:, :, 0, 1:].mean(1))


def test_teacher_resizes_and_resamples_to_student_grid(tmp_path):
    path, _ = encoder_file(tmp_path)
    teacher = build_teacher({"type": "maelab", "weights": str(path)})
    feats, attn = teacher.dense(images(size=64), grid=(8, 8), attention_layer=-1)
    assert feats.shape == (2, 64, 64) and attn.shape == (2, 64)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2))
    same = resample_tokens(feats, (8, 8), (8, 8))
    assert same is feats


@pytest.mark.parametrize(
    "name", ["openai", "laion2b_s34b_b88k", "hf-hub:timm/vit_base_patch16_clip_224", "https://x/y.pt"]
)
def test_hub_download_fails_naming_the_setting(name):
    with pytest.raises(HubDownloadError, match=r"heads\.mimic\.teacher\.weights.*local file path"):
        build_teacher({"type": "clip", "weights": name}, where="heads.mimic.teacher")


def test_missing_file_and_unresolved_uri_fail(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_teacher({"type": "dino", "weights": str(tmp_path / "nope.pth")})
    with pytest.raises(ValueError, match="registry URI"):
        build_teacher({"type": "maelab", "weights": "models:/x@champion"})


def test_clip_explicit_attention_matches_fused(clip_file):
    path, _ = clip_file
    teacher = build_teacher({"type": "clip", "weights": str(path), "model_kwargs": CLIP_KW})
    fused = teacher(images()).features
    teacher.set_fused_attn(False)
    torch.testing.assert_close(teacher(images()).features, fused, atol=1e-5, rtol=1e-5)

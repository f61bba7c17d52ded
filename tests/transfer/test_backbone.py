import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from maelab.models.vit import build_encoder, sincos_2d
from maelab.transfer.backbone import (
    adapt_state_dict,
    interpolate_patch_embed,
    interpolate_pos_embed,
    load_encoder,
    param_groups_lrd,
)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def save_encoder(path, cfg=TINY, metadata=True):
    enc = build_encoder(cfg)
    meta = {"encoder_config": json.dumps(cfg), "recipe": "tiny"} if metadata else None
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path), metadata=meta)
    return enc


def test_pos_embed_identity_at_same_size():
    pe = torch.randn(1, 1 + 16, 8)
    assert torch.equal(interpolate_pos_embed(pe, (4, 4)), pe)


def test_pos_embed_shapes_and_cls_slot():
    pe = torch.randn(1, 1 + 16, 8)
    out = interpolate_pos_embed(pe, (6, 10))
    assert out.shape == (1, 1 + 60, 8)
    assert torch.equal(out[:, :1], pe[:, :1])
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 8), (4, 4))


def test_pos_embed_upsampling_is_smooth():
    """Upsampled sin-cos embeddings vary more gently between neighbours and stay close to the fixed
    embedding of the finer grid scaled to the same physical positions."""
    pe = sincos_2d(16, (8, 8))[None]
    up = interpolate_pos_embed(pe, (16, 16))[0, 1:].reshape(16, 16, 16)
    src = pe[0, 1:].reshape(8, 8, 16)
    step_src = (src[:, 1:] - src[:, :-1]).abs().max()
    step_up = (up[:, 1:] - up[:, :-1]).abs().max()
    assert step_up < 0.75 * step_src
    # interior positions lie between their coarse neighbours: at most the coarse step away
    assert (
        up[2:-2, 2:-2] - src.repeat_interleave(2, 0).repeat_interleave(2, 1)[2:-2, 2:-2]
    ).abs().max() <= step_src


def test_patch_embed_resize():
    w = torch.randn(32, 3, 8, 8)
    assert interpolate_patch_embed(w, 8) is w
    assert interpolate_patch_embed(w, 16).shape == (32, 3, 16, 16)
    assert interpolate_patch_embed(w, 4, mode="pinv").shape == (32, 3, 4, 4)
    with pytest.raises(ValueError, match="unknown mode"):
        interpolate_patch_embed(w, 16, mode="nearest-ish")


def test_load_encoder_same_size_is_exact(tmp_path):
    enc = save_encoder(tmp_path / "e.safetensors")
    loaded, info = load_encoder(str(tmp_path / "e.safetensors"), {})
    assert info["config"]["embed_dim"] == 32 and info["recipe"] == "tiny"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval().forward_features(x), enc.eval().forward_features(x))


def test_load_encoder_new_resolution_and_patch(tmp_path):
    save_encoder(tmp_path / "e.safetensors")
    enc, _ = load_encoder(tmp_path / "e.safetensors", {}, img_size=64)
    assert enc.pos_embed.shape == (1, 1 + 64, 32)
    enc16, _ = load_encoder(tmp_path / "e.safetensors", {}, img_size=64, patch_size=16)
    assert enc16.patch_embed.proj.weight.shape == (32, 3, 16, 16)
    assert enc16.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 1 + 16, 32)


def test_load_encoder_without_metadata_uses_default(tmp_path):
    save_encoder(tmp_path / "e.safetensors", metadata=False)
    enc, info = load_encoder(tmp_path / "e.safetensors", TINY)
    assert enc.embed_dim == 32
    with pytest.raises(ValueError, match="no encoder_config"):
        load_encoder(tmp_path / "e.safetensors", {})


def test_load_encoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_encoder(tmp_path / "nope.safetensors", TINY)
    sd = build_encoder(TINY).state_dict()
    sd["blocks.9.extra"] = torch.zeros(1)  # weights that disagree with the file's own config
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata={"encoder_config": json.dumps(TINY)})
    with pytest.raises(ValueError, match=r"bad.safetensors: state dict does not match.*blocks.9.extra"):
        load_encoder(tmp_path / "bad.safetensors", TINY)


def test_random_init_uses_default_config():
    enc, info = load_encoder(None, TINY, img_size=64)
    assert info["path"] is None and enc.grid == (8, 8)


def test_adapt_state_dict_resizes():
    src = build_encoder(TINY).state_dict()
    dst = build_encoder({**TINY, "img_size": 48})
    out = adapt_state_dict(src, dst)
    assert out["pos_embed"].shape == dst.pos_embed.shape


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = build_encoder(TINY)
        self.head = nn.Linear(32, 3)


def test_layer_decay_groups():
    model = Wrapped()
    groups = param_groups_lrd(
        model, 0.05, 0.5, num_layers=2, no_weight_decay={"cls_token", "pos_embed"}, prefix="encoder."
    )
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["encoder.patch_embed.proj.weight"] == 0.5**3
    assert scale["encoder.cls_token"] == 0.5**3
    assert scale["encoder.blocks.0.attn.qkv.weight"] == 0.5**2
    assert scale["encoder.blocks.1.mlp.fc1.weight"] == 0.5
    assert scale["encoder.norm.weight"] == 1.0 and scale["head.weight"] == 1.0
    assert wd["encoder.blocks.0.attn.qkv.weight"] == 0.05
    assert wd["encoder.blocks.0.attn.qkv.bias"] == 0.0 and wd["encoder.cls_token"] == 0.0
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)

"""Interop with the official MAE layout, checked against an independent plain-torch forward.

``reference_mae_loss`` below is written for this test from the MAE paper (§3) and the official key
names only: it uses no maelab or timm module, just the tensors in the state dict.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from maelab.masking import MaskPlan
from maelab.models import build_pretrainer
from maelab.models.interop import load_official_mae, read_state_dict, save_official_mae, to_official_mae

ENC = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
DEC = dict(embed_dim=16, depth=2, num_heads=4)
RECIPE = {"encoder": ENC, "heads": {"pixel": dict(type="pixel_decoder", norm_pix_loss=True, **DEC)}}


def official_keys_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the official layout, named from the paper's architecture by hand."""
    g = torch.Generator().manual_seed(seed)
    d, dd, p, L = (
        ENC["embed_dim"],
        DEC["embed_dim"],
        ENC["patch_size"],
        (ENC["img_size"] // ENC["patch_size"]) ** 2,
    )

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    def block(prefix: str, dim: int) -> dict:
        return {
            f"{prefix}.norm1.weight": 1 + r(dim), f"{prefix}.norm1.bias": r(dim),
            f"{prefix}.attn.qkv.weight": r(3 * dim, dim), f"{prefix}.attn.qkv.bias": r(3 * dim),
            f"{prefix}.attn.proj.weight": r(dim, dim), f"{prefix}.attn.proj.bias": r(dim),
            f"{prefix}.norm2.weight": 1 + r(dim), f"{prefix}.norm2.bias": r(dim),
            f"{prefix}.mlp.fc1.weight": r(4 * dim, dim), f"{prefix}.mlp.fc1.bias": r(4 * dim),
            f"{prefix}.mlp.fc2.weight": r(dim, 4 * dim), f"{prefix}.mlp.fc2.bias": r(dim),
        }  # fmt: skip

    sd = {
        "cls_token": r(1, 1, d), "pos_embed": r(1, L + 1, d),
        "patch_embed.proj.weight": r(d, 3, p, p), "patch_embed.proj.bias": r(d),
        "norm.weight": 1 + r(d), "norm.bias": r(d),
        "mask_token": r(1, 1, dd), "decoder_embed.weight": r(dd, d), "decoder_embed.bias": r(dd),
        "decoder_pos_embed": r(1, L + 1, dd), "decoder_norm.weight": 1 + r(dd), "decoder_norm.bias": r(dd),
        "decoder_pred.weight": r(p * p * 3, dd), "decoder_pred.bias": r(p * p * 3),
    }  # fmt: skip
    for i in range(ENC["depth"]):
        sd.update(block(f"blocks.{i}", d))
    for i in range(DEC["depth"]):
        sd.update(block(f"decoder_blocks.{i}", dd))
    return sd


def _ln(x, sd, k):
    return F.layer_norm(x, x.shape[-1:], sd[f"{k}.weight"], sd[f"{k}.bias"], eps=1e-6)


def _block(x, sd, k, heads):
    b, n, d = x.shape
    h = _ln(x, sd, f"{k}.norm1") @ sd[f"{k}.attn.qkv.weight"].T + sd[f"{k}.attn.qkv.bias"]
    q, kk, v = h.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # [B, heads, N, dh] each
    att = ((q @ kk.transpose(-1, -2)) / math.sqrt(d // heads)).softmax(-1)
    h = (att @ v).transpose(1, 2).reshape(b, n, d)
    x = x + h @ sd[f"{k}.attn.proj.weight"].T + sd[f"{k}.attn.proj.bias"]
    h = F.gelu(_ln(x, sd, f"{k}.norm2") @ sd[f"{k}.mlp.fc1.weight"].T + sd[f"{k}.mlp.fc1.bias"])
    return x + h @ sd[f"{k}.mlp.fc2.weight"].T + sd[f"{k}.mlp.fc2.bias"]


def reference_mae_loss(sd, imgs, noise, ratio):
    p, b = ENC["patch_size"], imgs.shape[0]
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]  # [B, L, D]
    L = x.shape[1]
    keep = int(L * (1 - ratio))
    order = noise.argsort(-1)
    restore = order.argsort(-1)
    x = torch.stack([x[i, order[i, :keep]] for i in range(b)])
    mask = torch.ones(b, L)
    mask[:, :keep] = 0
    mask = torch.stack([mask[i, restore[i]] for i in range(b)])
    x = torch.cat([(sd["cls_token"] + sd["pos_embed"][:, :1]).expand(b, -1, -1), x], 1)
    for i in range(ENC["depth"]):
        x = _block(x, sd, f"blocks.{i}", ENC["num_heads"])
    x = _ln(x, sd, "norm")
    x = x @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    full = torch.cat([x[:, 1:], sd["mask_token"].expand(b, L - keep, -1)], 1)
    full = torch.stack([full[i, restore[i]] for i in range(b)])
    x = torch.cat([x[:, :1], full], 1) + sd["decoder_pos_embed"]
    for i in range(DEC["depth"]):
        x = _block(x, sd, f"decoder_blocks.{i}", DEC["num_heads"])
    pred = (_ln(x, sd, "decoder_norm") @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:]
    # target patches, (p, q, c) flattened per patch in raster order
    t = imgs.unfold(2, p, p).unfold(3, p, p)  # [B, C, gh, gw, p, q]
    t = t.permute(0, 2, 3, 4, 5, 1).reshape(b, L, p * p * 3)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - t) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum(), pred


def test_load_official_gives_same_loss_and_roundtrips():
    sd = official_keys_state()
    model = build_pretrainer(RECIPE).eval()
    assert load_official_mae(model, sd) == "full"
    g = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 16, generator=g)
    ref_loss, ref_pred = reference_mae_loss(sd, imgs, noise, 0.75)
    out = model({"image": imgs, "plan": MaskPlan.from_noise(noise, 0.75)})
    torch.testing.assert_close(out.outputs["pixel"], ref_pred, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=1e-5)
    back = to_official_mae(model)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_strict_keys_and_shapes():
    model = build_pretrainer(RECIPE)
    sd = official_keys_state()
    bad = dict(sd)
    del bad["blocks.1.mlp.fc2.bias"]
    bad["blocks.1.extra"] = torch.zeros(1)
    with pytest.raises(
        KeyError, match=r"missing keys \['blocks.1.mlp.fc2.bias'\].*unexpected keys \['blocks.1.extra'\]"
    ):
        load_official_mae(model, bad)
    wrong = dict(sd, **{"norm.weight": torch.ones(7)})
    with pytest.raises(ValueError, match="norm.weight"):
        load_official_mae(model, wrong)


def test_encoder_only_file_and_export(tmp_path):
    src = build_pretrainer(RECIPE)
    enc_only = tmp_path / "mae_pretrain_tiny.pth"
    save_official_mae(src, enc_only, encoder_only=True)
    assert not any(k.startswith("decoder") for k in read_state_dict(enc_only))
    dst = build_pretrainer(RECIPE)
    head_before = {k: v.clone() for k, v in dst.heads["pixel"].state_dict().items()}
    assert load_official_mae(dst, enc_only) == "encoder"
    assert all(
        torch.equal(a, b)
        for a, b in zip(dst.encoder.state_dict().values(), src.encoder.state_dict().values(), strict=True)
    )
    assert all(torch.equal(dst.heads["pixel"].state_dict()[k], v) for k, v in head_before.items())
    # full model through safetensors
    full = save_official_mae(src, tmp_path / "full.safetensors")
    assert load_official_mae(build_pretrainer(RECIPE), full) == "full"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        read_state_dict(junk)
    odd = tmp_path / "odd.pth"
    torch.save({"model": {"a": 1}}, odd)
    with pytest.raises(ValueError, match="odd.pth.*'model'"):
        read_state_dict(odd)

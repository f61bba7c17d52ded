import argparse
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from maelab.models.vit import build_encoder
from maelab.transfer.export import cli, export_encoder, timm_kwargs

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0)


@pytest.fixture
def encoder_file(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder(TINY).eval()
    path = tmp_path / "encoder.safetensors"
    save_file(enc.state_dict(), str(path), metadata={"encoder_config": json.dumps(TINY), "recipe": "tiny"})
    return enc, path


def timm_from(path, **extra):
    kwargs = json.loads(extra.pop("kwargs"))
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=0),
        **kwargs,
        **extra,
    ).eval()


def test_timm_roundtrip_strict(encoder_file, tmp_path):
    enc, path = encoder_file
    out = export_encoder(path, "timm", tmp_path / "timm.safetensors")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    model = timm_from(out, kwargs=meta["timm_kwargs"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), enc.forward_features(x), atol=1e-5, rtol=1e-5)
    # strict: a key timm does not know must make loading fail
    sd = load_file(str(out))
    sd["blocks.0.extra"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        timm_from(tmp_path / "extra.safetensors", kwargs=meta["timm_kwargs"])


def test_detectron2_layout(encoder_file, tmp_path):
    _, path = encoder_file
    out = export_encoder(path, "detectron2", tmp_path / "d2.pth")
    obj = torch.load(out, weights_only=True)
    keys = set(obj["model"])
    assert all(k.startswith("backbone.net.") for k in keys)
    assert "backbone.net.pos_embed" in keys and "backbone.net.blocks.1.attn.qkv.weight" in keys
    assert "backbone.net.cls_token" not in keys and not any(k.startswith("backbone.net.norm.") for k in keys)
    st = export_encoder(path, "detectron2", tmp_path / "d2.safetensors")
    assert set(load_file(str(st))) == keys


def test_cli_and_errors(encoder_file, tmp_path):
    _, path = encoder_file
    args = argparse.Namespace(encoder=str(path), format="timm", out=str(tmp_path / "o.safetensors"), env=None)
    assert cli(args) == 0 and (tmp_path / "o.safetensors").exists()
    with pytest.raises(ValueError, match="--format"):
        export_encoder(path, "onnx", tmp_path / "x")
    assert timm_kwargs({**TINY, "foo": 1}) == TINY

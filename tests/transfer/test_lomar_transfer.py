"""A LoMaR encoder carries its iRPE into transfer (Chen et al. 2022, §2: fine-tune on all patches with global
average pooling; ViTDet §2.3; UperNet §2.4): the tables are loaded, not re-initialised, at any grid size;
the mask token is left behind; export to timm / detectron2 is refused with the reason."""

import json

import pytest
import torch
from safetensors.torch import save_file

from maelab.masking import MaskPlan
from maelab.models import build_pretrainer
from maelab.models.irpe import ContextualProductRPE
from maelab.transfer.backbone import load_encoder
from maelab.transfer.classification import FineTuneClassifier
from maelab.transfer.export import export_encoder
from maelab.transfer.segmentation import ViTUperNet
from maelab.transfer.vitdet import ViTDetBackbone

ENC = dict(
    img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, mask_token=True, window_size=4,
    rel_pos="irpe", abs_pos=False,
)  # fmt: skip
RECIPE = {
    "name": "lomar_tiny",
    "encoder": ENC,
    "masker": {"type": "window", "ratio": 0.75, "window": 4, "views": 2},
    "heads": {"pixel": {"type": "lomar"}},
}


@pytest.fixture
def lomar_file(tmp_path):
    """A LoMaR encoder after one optimiser step, saved as pre-training saves it."""
    torch.manual_seed(0)
    model = build_pretrainer(RECIPE)
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(2, 3, 32, 32),
        "plan": MaskPlan.collate([model.masker(g) for _ in range(2)]),
    }
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(batch).loss.backward()
    opt.step()
    state = model.encoder.state_dict()
    path = tmp_path / "encoder.safetensors"
    meta = {"recipe": "lomar_tiny", "encoder_config": json.dumps(ENC)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    return state, path


def _tables(encoder) -> list[torch.Tensor]:
    return [blk.attn.rel_pos.table for blk in encoder.blocks]


@pytest.mark.parametrize("img_size", [32, 48])
def test_rpe_tables_are_loaded_not_reinitialised(lomar_file, img_size):
    state, path = lomar_file
    torch.manual_seed(123)  # a fresh init would draw other tables
    enc, info = load_encoder(path, {}, img_size=img_size)
    assert enc.rel_pos == "irpe" and not enc.abs_pos and not enc.pos_embed.any()
    assert enc.mask_token is None and enc.window_size is None  # all patches, no windows, no mask token
    for i, table in enumerate(_tables(enc)):
        assert isinstance(enc.blocks[i].attn.rel_pos, ContextualProductRPE)
        assert torch.equal(table, state[f"blocks.{i}.attn.rel_pos.table"])
    fresh = ContextualProductRPE((8, 8), 16)
    assert not torch.allclose(_tables(enc)[0], fresh.table)
    out = enc(torch.randn(2, 3, img_size, img_size))
    assert out.shape == (2, 1 + (img_size // 4) ** 2, 32)  # iRPE over the full grid


def test_fine_tune_probe_vitdet_and_upernet_run_with_rpe(lomar_file):
    _, path = lomar_file
    enc, _ = load_encoder(path, {}, img_size=32)
    x = torch.randn(2, 3, 32, 32)
    clf = FineTuneClassifier(enc, num_classes=5, global_pool=True)  # all patches + global average pooling
    logits = clf(x)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert enc.blocks[0].attn.rel_pos.table.grad.abs().sum() > 0  # fine-tuned, not frozen out
    enc, _ = load_encoder(path, {}, img_size=32)
    det = ViTDetBackbone(enc, out_channels=16, window_size=4)  # windowed and global blocks, no CLS
    maps = det(x)
    assert maps["0"].shape == (2, 16, 8, 8)
    enc, _ = load_encoder(path, {}, img_size=32)
    seg = ViTUperNet(enc, num_classes=3, decoder_channels=16)
    assert seg(x).shape[:2] == (2, 3)


@pytest.mark.parametrize("fmt", ["timm", "detectron2"])
def test_export_refuses_rpe(lomar_file, tmp_path, fmt):
    _, path = lomar_file
    with pytest.raises(ValueError, match="relative position encoding"):
        export_encoder(path, fmt, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()

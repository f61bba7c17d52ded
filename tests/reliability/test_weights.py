"""``maelab export`` and transfer refuse weights that disagree with their metadata (shapes, missing keys,
NaN, a config describing a far larger model), naming the file, before building any model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from maelab.models.vit import build_encoder
from maelab.transfer.backbone import load_encoder
from maelab.transfer.export import export_encoder

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def _write(path: Path, state: dict, config: dict) -> Path:
    save_file(state, str(path), metadata={"encoder_config": json.dumps(config)})
    return path


def _cases() -> dict:
    good = build_encoder(TINY).state_dict()
    nan = dict(good)
    nan["blocks.1.mlp.fc1.weight"] = torch.full_like(good["blocks.1.mlp.fc1.weight"], float("nan"))
    shape = dict(good)
    shape["blocks.0.attn.proj.weight"] = torch.zeros(32, 16)
    missing = {k: v for k, v in good.items() if k != "norm.weight"}
    return {
        "nan": (nan, TINY, "'blocks.1.mlp.fc1.weight' holds NaN"),
        "shape": (shape, TINY, "'blocks.0.attn.proj.weight' has shape [32, 16]"),
        "missing": (missing, TINY, "missing ['norm.weight']"),
        "depth lies": (good, {**TINY, "depth": 12}, "missing ['blocks.2."),
        # one tensor describing a ~200B-parameter model: refused before anything that size is built
        "huge": ({"cls_token": torch.zeros(1, 1, 32)}, {**TINY, "embed_dim": 16384, "depth": 64}, "missing"),
    }


@pytest.mark.parametrize("case", ["nan", "shape", "missing", "depth lies", "huge"])
def test_export_and_transfer_refuse_bad_weights(tmp_path: Path, case: str) -> None:
    state, config, needle = _cases()[case]
    path = _write(
        tmp_path / f"{case.replace(' ', '_')}.safetensors",
        {k: v.contiguous() for k, v in state.items()},
        config,
    )
    with pytest.raises(ValueError) as e:
        export_encoder(path, "timm", tmp_path / "out.safetensors")
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ValueError) as e:
        load_encoder(path, TINY)
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)


def test_huge_metadata_is_refused_under_memory_cap(tmp_path: Path, capped) -> None:
    path = _write(
        tmp_path / "huge.safetensors",
        {"cls_token": torch.zeros(1, 1, 32)},
        {**TINY, "embed_dim": 16384, "depth": 64},
    )
    code = (
        "import sys\nfrom maelab.transfer.backbone import load_encoder\n"
        "try:\n    load_encoder(sys.argv[1], {})\n"
        "except ValueError as e:\n    print('ERROR', e)\n    sys.exit(3)\n"
    )
    out = capped(code, str(path))
    assert out.returncode == 3 and "huge.safetensors" in out.stdout, (out.returncode, out.stderr[-1500:])


def test_good_weights_still_export(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.safetensors", build_encoder(TINY).state_dict(), TINY)
    assert export_encoder(path, "timm", tmp_path / "out.safetensors").is_file()

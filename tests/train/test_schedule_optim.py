import math

import pytest
import torch
from fake_parts import build_pretrainer, tiny_recipe

from maelab.train.optim import build_optimizer, param_groups
from maelab.train.precision import resolve_precision
from maelab.train.schedule import CosineSchedule, base_lr, resolve_steps


def test_linear_scaling_rule():
    cfg = {"batch_size": 64, "accum_steps": 8, "blr": 1.5e-4, "lr": None}
    assert base_lr(cfg, world_size=8) == pytest.approx(1.5e-4 * 4096 / 256)
    assert base_lr({**cfg, "lr": 3e-4}, world_size=8) == 3e-4


def test_warmup_then_half_cosine():
    s = CosineSchedule(lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1)
    vals = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))  # monotone after warm-up


def test_steps_win_over_epochs():
    assert resolve_steps({"steps": 100, "epochs": 5, "warmup_steps": 7}, steps_per_epoch=10) == (100, 7)
    assert resolve_steps({"steps": None, "epochs": 5, "warmup_epochs": 2}, steps_per_epoch=10) == (50, 20)
    with pytest.raises(ValueError, match="train.steps or train.epochs"):
        resolve_steps({}, 10)


def test_no_decay_on_norms_biases_and_tokens():
    model = build_pretrainer(tiny_recipe())
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {
        "encoder.pos",
        "mask_token",
        "encoder.norm.weight",
        "encoder.norm.bias",
        "encoder.embed.bias",
    } <= nd
    assert d == {"encoder.embed.weight", "encoder.mlp.0.weight", "encoder.mlp.2.weight", "decoder.weight"}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, 1e-3, {"betas": [0.9, 0.95], "weight_decay": 0.05})
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert opt.defaults["fused"] or opt.defaults["foreach"]


def test_precision_rules():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="train.precision"):
        resolve_precision("int4", cpu)

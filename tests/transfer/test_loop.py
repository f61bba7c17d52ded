import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maelab.transfer.config import FineTuneConfig, SegmentationConfig
from maelab.transfer.loop import check_finite, fine_tune, lr_schedule, poly_lr, resolve_lr, step_lr


def test_step_lr():
    assert step_lr(0, 1.0, 100, 10, (0.9, 0.95)) == pytest.approx(0.001)
    assert step_lr(50, 1.0, 100, 10, (0.9, 0.95)) == 1.0
    assert step_lr(92, 1.0, 100, 10, (0.9, 0.95)) == pytest.approx(0.1)
    assert step_lr(96, 1.0, 100, 10, (0.9, 0.95)) == pytest.approx(0.01)


def test_poly_lr():
    assert poly_lr(0, 1.0, 100, 10) == pytest.approx(1e-6)
    assert poly_lr(10, 1.0, 100, 10) == pytest.approx(1.0)
    assert poly_lr(55, 1.0, 100, 10) == pytest.approx(0.5)
    assert math.isclose(poly_lr(100, 1.0, 100, 10), 0.0, abs_tol=1e-12)


def test_each_task_gets_its_schedule_and_lr_rule():
    cosine = lr_schedule(FineTuneConfig(), 1.0, 100, 10)
    assert cosine(5) == pytest.approx(0.5) and cosine(100) == pytest.approx(1e-6)
    poly = lr_schedule(SegmentationConfig(), 1.0, 100, 10)
    assert poly(55) == pytest.approx(0.5)
    assert resolve_lr(FineTuneConfig(blr=1e-3, accum_steps=2), 128) == pytest.approx(1e-3)  # x256/256
    assert resolve_lr(FineTuneConfig(lr=0.01, blr=1e-3), 128) == 0.01


def test_check_finite_names_the_step_and_the_parts():
    check_finite("fine-tune", torch.tensor(1.0), 0)
    bad = torch.tensor(float("nan"))
    with pytest.raises(FloatingPointError, match=r"detection: loss is nan at step 7 \(loss_box=nan\)"):
        check_finite("detection", bad, 7, {"loss_box": bad})


def _fit(batch_size: int, accum: int) -> torch.Tensor:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    model = nn.Sequential(nn.Linear(3, 1))
    loader = DataLoader(TensorDataset(x, y), batch_size, shuffle=False, drop_last=True)
    cfg = FineTuneConfig(lr=0.1, steps=3, warmup_steps=0, weight_decay=0.0, accum_steps=accum)

    def loss_fn(batch):
        xb, yb = batch
        return ((model(xb) - yb) ** 2).mean(), None

    result = fine_tune(model, loader, loss_fn, cfg, num_layers=0, prefix="encoder.")
    assert result.steps == 3 and result.final_loss is not None
    return model[0].weight.detach().clone()


def test_accumulation_matches_the_larger_batch():
    # two micro-batches of 4 accumulate the gradient of one batch of 8: the same AdamW steps
    torch.testing.assert_close(_fit(4, accum=2), _fit(8, accum=1))
    assert not torch.allclose(_fit(4, accum=1), _fit(8, accum=1))


def test_fine_tune_stops_on_a_non_finite_loss():
    model = nn.Linear(2, 1)
    loader = DataLoader(TensorDataset(torch.ones(4, 2)), 2)
    cfg = FineTuneConfig(lr=0.1, steps=3, warmup_steps=0)
    with pytest.raises(FloatingPointError, match="finetune: loss is nan at step 0"):
        fine_tune(
            model, loader, lambda b: (model(b[0]).sum() * float("nan"), None), cfg, num_layers=0, prefix=""
        )

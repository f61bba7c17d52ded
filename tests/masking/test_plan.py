"""A MaskPlan subclass keeps its extra fields through DataLoader workers, ``.to()`` and tracing."""

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from maelab.masking import MaskPlan, RandomMasker
from maelab.train.data import collate


@dataclass(frozen=True)
class WindowPlan(MaskPlan):
    """LoMaR-like plan: which window of the grid each sample's tokens come from."""

    window_ids: Tensor


class _WindowPlans(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        base = RandomMasker((4, 4), 0.5)(torch.Generator().manual_seed(i))
        return {"plan": WindowPlan(*base.tensors(), window_ids=torch.full((4,), i))}


def test_subclass_survives_collate_in_two_workers_and_to():
    # the training collate (a dict of samples) hands plans to MaskPlan.collate
    loader = DataLoader(_WindowPlans(), batch_size=3, num_workers=2, collate_fn=collate)
    batches = [b["plan"] for b in loader]
    assert [type(b) for b in batches] == [WindowPlan, WindowPlan]
    first = batches[0].to("cpu")
    assert type(first) is WindowPlan
    assert first.window_ids.shape == (3, 4)
    assert torch.equal(first.window_ids[:, 0], torch.arange(3))
    assert torch.equal(batches[1].window_ids[:, 0], torch.arange(3, 6))
    assert first.mask.shape == (3, 16) and first.ids_keep.shape == (3, 8)


def test_tensors_round_trip_keeps_the_type():
    plan = WindowPlan(*RandomMasker((2, 2), 0.5)().tensors(), window_ids=torch.arange(4))
    again = type(plan).from_tensors(*plan.tensors())
    assert type(again) is WindowPlan and torch.equal(again.window_ids, plan.window_ids)


def test_collate_refuses_mixed_types():
    a = RandomMasker((2, 2), 0.5)()
    b = WindowPlan(*a.tensors(), window_ids=torch.arange(4))
    with pytest.raises(TypeError, match="mixed plan types"):
        MaskPlan.collate([a, b])

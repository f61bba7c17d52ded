"""Self-guided MAE's informed masker (§4): normalised cut, planted object, exact counts, the switch."""

import numpy as np
import pytest
import scipy.linalg
import torch

from maelab.masking import MaskContext, MaskPlan, SelfGuidedMasker, build_masker
from maelab.masking.ncut import bipartition, ncut_vector, relevance, similarity_graph
from maelab.masking.self_guided import INFORMED, RANDOM, informed_mask, sample_noise
from maelab.models import build_pretrainer

GRID = (8, 8)
L = 64
OBJECT = [18, 19, 20, 26, 27, 28, 34, 35, 36]  # a 3 x 3 block of the 8 x 8 grid


def planted(b: int = 2, noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    """[b, 64, 16] features: background around one direction, a 3x3 object around another, plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = noise * torch.randn(b, L, 16, generator=g)
    x[:, :, 0] += 1.0
    x[:, OBJECT, 0] -= 1.0
    x[:, OBJECT, 1] += 1.0
    return x


@pytest.mark.parametrize("graph", ["clamp", "tokencut", "shift"])
@pytest.mark.parametrize("solver", ["eigh", "power"])
def test_solver_agrees_with_scipy_generalised_eigh(graph, solver):
    w = similarity_graph(planted(3, noise=0.3), graph)
    y = ncut_vector(w, solver)  # the default 100 iterations
    for b in range(3):
        wb = w[b].double().numpy()
        d = np.diag(wb.sum(1))
        vals, vecs = scipy.linalg.eigh(d - wb, d)  # generalised problem, ascending, y^T D y = 1
        yb = y[b].double().numpy()
        # the same eigenpair: (D - W) y = l2 D y with scipy's l2, and scipy's scaling y^T D y = 1
        residual = (d - wb) @ yb - vals[1] * d @ yb
        assert np.abs(residual).max() < 1e-3 * np.abs(d).max(), (graph, solver, b)
        assert yb @ d @ yb == pytest.approx(1.0, abs=1e-3)
        assert vals[2] - vals[1] > 1e-2  # a simple eigenvalue, so the vector itself is determined
        ref = vecs[:, 1]
        assert np.allclose(np.sign(yb @ ref) * yb, ref, atol=2e-3), (graph, solver, b)


def test_planted_object_is_ranked_and_masked_first():
    x = planted(4)
    cluster = bipartition(ncut_vector(similarity_graph(x)))
    assert cluster[:, OBJECT].all() and cluster.sum(-1).eq(len(OBJECT)).all()  # the small side is the object
    s = relevance(x, cluster)
    top = torch.argsort(s, dim=-1, descending=True)[:, : len(OBJECT)]
    assert all(sorted(row) == OBJECT for row in top.tolist())
    mask = informed_mask(s, torch.rand(4, L), ratio=0.75, n_hint=0, hint="none")
    assert mask[:, OBJECT].all() and mask.sum(-1).eq(L - 16).all()
    # the background target masks the other side first: the object stays visible at ratio 0.75
    mask_bg = informed_mask(relevance(x, ~cluster), torch.rand(4, L), ratio=0.75, n_hint=0, hint="none")
    assert not mask_bg[:, OBJECT].any()


@pytest.mark.parametrize("hint", ["random", "s_based", "none"])
@pytest.mark.parametrize("ratio", [0.6, 0.75, 0.9])
def test_exact_visible_count_with_hints(hint, ratio):
    s, noise = torch.randn(5, L), torch.rand(5, L)
    mask = informed_mask(s, noise, ratio, n_hint=3, hint=hint)
    keep = int(L * (1 - ratio))
    assert (~mask).sum(-1).eq(keep).all()
    order = torch.argsort(s, dim=-1, descending=True, stable=True)
    n_hint = 0 if hint == "none" else 3
    top = order[:, : L - keep + n_hint]
    # every masked patch is among the most relevant; exactly n_hint of those stay visible as hints
    assert mask.gather(1, order[:, L - keep + n_hint :]).logical_not().all()
    assert (~mask.gather(1, top)).sum(-1).eq(n_hint).all()


def test_switch_rule_is_armed_by_a_crossing_from_below():
    m = SelfGuidedMasker(GRID)
    m.observe(0.74, 0.26, step=0)  # near-uniform attention at init: R_MO ~ m, not a switch
    assert m.phase == RANDOM and not m.armed
    m.observe(0.40, 0.60, step=50)
    assert m.phase == RANDOM and m.armed
    m.observe(0.55, 0.45, step=100)
    assert m.phase == INFORMED and m.switch_step == 100
    m.observe(0.30, 0.70, step=150)  # permanent
    assert m.phase == INFORMED and m.switch_step == 100
    forced = SelfGuidedMasker(GRID, switch_epoch=3)
    forced.observe(0.4, 0.6, 0)
    forced.observe(0.6, 0.4, 50)
    assert forced.phase == RANDOM  # the epoch decides


def tiny_recipe(**masker):
    return {
        "name": "sgmae_test",
        "encoder": {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2},
        "masker": {"type": "self_guided", "ratio": 0.75, "monitor_every": 1, "monitor_size": 2, **masker},
        "heads": {"pixel": {"type": "pixel_decoder", "embed_dim": 32, "depth": 2, "num_heads": 2}},
    }


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"source": "decoder", "layer": -1, "hint": "s_based", "target": "alternate"},
        {"layer": 0, "feature": "block", "include_cls": True, "graph": "tokencut", "solver": "power"},
    ],
)
def test_masker_in_the_step_switches_and_keeps_exact_counts(knobs):
    torch.manual_seed(0)
    model = build_pretrainer(tiny_recipe(switch_epoch=1, **knobs))
    assert isinstance(model.masker, SelfGuidedMasker) and model.masker.grid == GRID
    batch = {"image": torch.randn(4, 3, 32, 32), "index": torch.arange(4)}
    out = model({**batch, "context": MaskContext(step=0, epoch=0, total_steps=10)})
    assert model.masker.phase == RANDOM and "sgmae/R_M_O" in model.masker.metrics()
    out.loss.backward()
    out = model({**batch, "context": MaskContext(step=1, epoch=1, total_steps=10)})
    assert model.masker.phase == INFORMED and model.masker.switch_step == 1
    assert out.plan.mask.shape == (4, L) and (~out.plan.mask).sum(-1).eq(16).all()
    assert torch.isfinite(out.loss)


def test_phase_and_monitor_batch_live_in_the_state_dict():
    torch.manual_seed(0)
    model = build_pretrainer(tiny_recipe(switch_epoch=0))
    batch = {"image": torch.randn(4, 3, 32, 32), "index": torch.arange(4)}
    model({**batch, "context": MaskContext(step=3, epoch=0, total_steps=10)})
    state = model.state_dict()
    assert state["masker.run_state"].tolist() == [INFORMED, 3, 0, 3]  # phase, switch step, armed, monitored
    fresh = build_pretrainer(tiny_recipe(switch_epoch=0))
    fresh.load_state_dict(state)
    assert fresh.masker.phase == INFORMED and fresh.masker.switch_step == 3
    assert torch.equal(fresh.masker.monitor_images, model.masker.monitor_images)
    assert fresh.masker.metrics() == model.masker.metrics()


def test_unknown_knob_is_a_clear_error():
    with pytest.raises(ValueError, match="masker.target"):
        build_masker({"type": "self_guided", "target": "sky"}, GRID)


def test_flops_count_the_informed_pass():
    from maelab.analysis.flops import count_gmacs

    mae = {**tiny_recipe(), "masker": {"type": "random", "ratio": 0.75}}
    informed = tiny_recipe(switch_epoch=0, monitor_every=0)
    # the no-grad pass over all 64 tokens up to block 1 of 3 (layer -2) comes on top of MAE's forward
    assert count_gmacs(informed) > count_gmacs(mae) * 1.2


def test_refresh_every_masks_at_random_between_refreshes():
    torch.manual_seed(0)
    model = build_pretrainer(tiny_recipe(switch_epoch=0, monitor_every=0, refresh_every=2, hint="none"))
    batch = {"image": torch.randn(2, 3, 32, 32), "index": torch.arange(2)}
    ctx = MaskContext(step=0, epoch=0, total_steps=10, model=model)
    informed = model.masker.plan_batch(batch, ctx)
    between = model.masker.plan_batch(batch, MaskContext(step=1, epoch=0, total_steps=10, model=model))
    noise = sample_noise(0, 0, [0, 1], L)
    assert torch.equal(between.mask, MaskPlan.from_noise(noise, 0.75).mask)  # the per-sample random plan
    assert not torch.equal(informed.mask, between.mask)
    assert torch.equal(
        informed.mask, informed_mask(model.masker.scores(model, batch["image"], 0), noise, 0.75, 0)
    )

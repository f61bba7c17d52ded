"""MR-MAE's mimic head (Eq. 2), focused mimicking and multi-layer fusion (§3.3), with a fake teacher whose
features and CLS attention the tests set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maelab.masking import FocusedMasker, MaskContext, MaskPlan
from maelab.models import build_pretrainer
from maelab.models.heads.mimic import DecoderMimicHead, MimicHead, mimic_loss, normalize_targets
from maelab.models.vit import build_encoder
from maelab.teachers.base import Teacher, TeacherOutput

ENC = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
GRID, L, C = (4, 4), 16, 12


class FakeTeacher(Teacher):
    """Features and CLS attention held in tensors the test edits; counts its forwards."""

    def __init__(self, b: int = 2) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.embed_dim, self.depth = (32, 32), 8, C, 2
        g = torch.Generator().manual_seed(0)
        self.feats = torch.randn(b, L, C, generator=g)
        self.attn = torch.rand(b, L, generator=g).softmax(-1)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the teacher a device
        self.calls, self.seen = 0, None
        self.freeze()

    def encode(self, x, attention_layer):
        self.calls += 1
        self.seen = x.clone()
        return TeacherOutput(
            self.feats.clone(), self.grid, self.attn.clone() if attention_layer is not None else None
        )


def plan_for(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MaskPlan.from_noise(torch.rand(b, L, generator=g), 0.75)


def latent(b=2, n_keep=4):
    return torch.randn(b, 1 + n_keep, ENC["embed_dim"], generator=torch.Generator().manual_seed(5))


def test_mimic_loss_reads_only_visible_tokens():
    teacher = FakeTeacher()
    head = MimicHead(build_encoder(ENC).spec, teacher, target_norm="layernorm")
    plan, lat, image = plan_for(), latent(), torch.randn(2, 3, 32, 32)
    base, _ = head(lat, plan, {"image": image}, {})
    masked_id = int(plan.mask[0].nonzero()[0])
    teacher.feats[0, masked_id] += 100.0  # a masked token's teacher feature
    assert torch.equal(head(lat, plan, {"image": image}, {})[0], base)
    visible_id = int(plan.ids_keep[0, 0])
    teacher.feats[0, visible_id] += torch.arange(C).float()  # a visible token (not a shift LN removes)
    assert not torch.equal(head(lat, plan, {"image": image}, {})[0], base)


def test_mimic_loss_is_eq2_on_gathered_normalised_targets():
    teacher = FakeTeacher()
    plan, lat, image = plan_for(), latent(), torch.randn(2, 3, 32, 32)
    for norm, reduction in [("none", "mean"), ("layernorm", "mean"), ("l2", "sum")]:
        head = MimicHead(build_encoder(ENC).spec, teacher, target_norm=norm, reduction=reduction)
        loss, pred = head(lat, plan, {"image": image}, {})
        target = torch.stack([teacher.feats[i, plan.ids_keep[i]] for i in range(2)])  # F_v [B, l_v, C]
        if norm == "layernorm":
            target = (target - target.mean(-1, keepdim=True)) / (
                target.var(-1, unbiased=False, keepdim=True) + 1e-6
            ).sqrt()
        elif norm == "l2":
            target = target / target.norm(dim=-1, keepdim=True)
        per_token = (head.proj(lat[:, 1:]) - target).pow(2)
        want = per_token.sum(-1).mean() if reduction == "sum" else per_token.mean()  # 1/l_v ||.||^2
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        assert pred.shape == (2, 4, C)


def test_teacher_sees_full_image_and_stays_out_of_the_module_tree():
    teacher = FakeTeacher()
    head = MimicHead(build_encoder(ENC).spec, teacher)
    image = torch.randn(2, 3, 32, 32)
    head(latent(), plan_for(), {"image": image}, {})
    torch.testing.assert_close(teacher.seen, image)  # unmasked, same view (same normalisation here)
    assert not any(k.startswith("_teacher") or "anchor" in k for k in head.state_dict())
    assert {n for n, _ in head.named_parameters()} == {"proj.weight", "proj.bias"}


def test_normalize_targets_kinds():
    x = torch.randn(3, 5, 7) * 10 + 3
    assert torch.equal(normalize_targets(x, "none"), x)
    torch.testing.assert_close(normalize_targets(x, "l2").norm(dim=-1), torch.ones(3, 5))
    torch.testing.assert_close(normalize_targets(x, "layernorm"), F.layer_norm(x, (7,), eps=1e-6))
    with pytest.raises(ValueError, match="target_norm"):
        normalize_targets(x, "batchnorm")
    assert mimic_loss(torch.zeros(1, 2, 3), torch.ones(1, 2, 3), "sum") == 3.0


def recipe(**extra):
    r = {
        "name": "mrmae_test",
        "encoder": ENC,
        "masker": {"type": "random", "ratio": 0.75},
        "heads": {
            "pixel": {"type": "pixel_decoder", "weight": 0.5, "embed_dim": 16, "depth": 1, "num_heads": 2},
            "mimic": {
                "type": "mimic",
                "weight": 0.5,
                "teacher": {"type": "maelab", "weights": "random", "config": ENC},
            },
        },
    }
    r.update(extra)
    return r


def test_focused_masker_keeps_the_top_saliency_tokens():
    teacher = FakeTeacher()
    r = recipe(masker={"type": "focused", "ratio": 0.75, "layer": -1})
    r["heads"]["mimic"]["teacher"] = teacher  # a built teacher in place of its config
    model = build_pretrainer(r)
    image = torch.randn(2, 3, 32, 32)
    out = model({"image": image, "context": MaskContext(step=3)})
    want = torch.topk(teacher.attn, 4, dim=-1).indices
    assert torch.equal(out.plan.ids_keep, want)  # most salient first
    assert torch.equal(out.plan.mask.sum(-1), torch.tensor([12, 12]))
    assert teacher.calls == 1  # one teacher forward per step: the head reused the masker's features
    assert torch.isfinite(out.loss)


def test_focused_masker_needs_a_teacher_head():
    masker = FocusedMasker(GRID, 0.75)
    model = build_pretrainer({**recipe(), "heads": {"pixel": recipe()["heads"]["pixel"]}})
    with pytest.raises(ValueError, match="no head with a teacher"):
        masker.plan_batch({"image": torch.randn(1, 3, 32, 32)}, MaskContext(model=model))


def test_fusion_sums_the_chosen_layers():
    model = build_pretrainer(recipe(fusion_layers=[0, 2]))
    seen = {}
    pixel = model.heads["pixel"]
    orig = pixel.forward

    def spy(lat, plan, batch, inter):
        seen["latent"] = lat
        return orig(lat, plan, batch, inter)

    pixel.forward = spy
    image, plan = torch.randn(2, 3, 32, 32), plan_for()
    out = model({"image": image, "plan": plan})
    enc = model.encoder
    _, (x0, x2) = enc.forward_intermediates(image, plan, [0, 2])
    want = enc.norm(x0 + x2)  # element-wise sum of blocks 0 and 2, then the final norm
    torch.testing.assert_close(seen["latent"], want)
    torch.testing.assert_close(
        out.outputs["mimic"], model.heads["mimic"].proj(want[:, 1:])
    )  # both heads read it
    assert not torch.allclose(want, enc.forward_features(image, plan))


def test_total_loss_is_half_and_half_and_teacher_gets_no_grad():
    model = build_pretrainer(recipe())
    out = model({"image": torch.randn(2, 3, 32, 32), "plan": plan_for()})
    torch.testing.assert_close(out.loss, 0.5 * out.losses["pixel"] + 0.5 * out.losses["mimic"])
    out.loss.backward()
    teacher = model.heads["mimic"].teacher
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert model.heads["mimic"].proj.weight.grad is not None
    assert not any("teacher" in k for k in model.state_dict())


def test_decoder_mimic_head_scores_features_on_masked_tokens():
    teacher = FakeTeacher()
    head = DecoderMimicHead(build_encoder(ENC).spec, teacher, embed_dim=16, depth=1, num_heads=2)
    plan, lat, image = plan_for(), latent(), torch.randn(2, 3, 32, 32)
    base, pred = head(lat, plan, {"image": image}, {})
    assert pred.shape == (2, L, 8 * 8 * 3)
    teacher.feats[0, int(plan.ids_keep[0, 0])] += 100.0  # a visible token: not a target after the decoder
    assert torch.equal(head(lat, plan, {"image": image}, {})[0], base)
    teacher.feats[0, int(plan.mask[0].nonzero()[0])] += torch.arange(C).float()  # a masked token: is
    assert not torch.equal(head(lat, plan, {"image": image}, {})[0], base)


def test_teacher_runs_each_step_without_a_masker_and_keeps_nothing():
    teacher = FakeTeacher()
    head = MimicHead(build_encoder(ENC).spec, teacher)
    for _ in range(2):
        head(latent(), plan_for(), {"image": torch.randn(2, 3, 32, 32)}, {})
    assert teacher.calls == 2 and head._cached is None

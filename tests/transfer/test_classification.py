import torch

from maelab.models.vit import build_encoder
from maelab.transfer.classification import FineTuneClassifier, LinearProbe, topk_correct, train_linear_probe
from maelab.transfer.config import FineTuneConfig, LinearProbeConfig

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def toy_features(n, gen, dim=16, classes=4):
    centers = torch.randn(classes, dim, generator=gen) * 3
    y = torch.randint(0, classes, (n,), generator=gen)
    return centers[y] + torch.randn(n, dim, generator=gen) + 5.0, y  # offset: BN must whiten it away


def test_linear_probe_separates_toy_clusters():
    gen = torch.Generator().manual_seed(0)
    x, y = toy_features(600, gen)
    cfg = LinearProbeConfig(blr=0.1, batch_size=64, epochs=20, warmup_epochs=2)
    head = train_linear_probe(x[:400], y[:400], 4, cfg)
    acc = (head(x[400:]).argmax(1) == y[400:]).float().mean()
    assert acc > 0.95
    untrained = LinearProbe(16, 4).eval()
    untrained.bn.running_mean.copy_(x.mean(0))
    untrained.bn.running_var.copy_(x.var(0))
    assert (untrained(x[400:]).argmax(1) == y[400:]).float().mean() < 0.7


def test_linear_probe_bn_has_no_affine():
    head = LinearProbe(8, 3)
    assert head.bn.weight is None and head.bn.eps == 1e-6


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2, 5)) == [1, 2, 3]


def test_finetune_classifier_pools_and_trains():
    model = FineTuneClassifier(build_encoder(TINY), num_classes=5)
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 5)
    out.sum().backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert model.encoder.norm.weight.grad is None  # global pool: fc_norm replaces the encoder norm (MAE)
    cls = FineTuneClassifier(build_encoder(TINY), num_classes=5, global_pool=False)
    assert cls(x).shape == (4, 5)


def _scenes_fixture():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "scenes_fixture", Path(__file__).with_name("scenes_fixture.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path, monkeypatch):
    from maelab.transfer.data import ClassificationSet

    manifest = _scenes_fixture().make_scenes(tmp_path, n_train=2, n_val=1, size=32)
    monkeypatch.chdir(tmp_path)
    rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
    aug = dict(rand_augment="rand-m9-mstd0.5-inc1", erase_prob=1.0)
    a, b = ClassificationSet(rows, 32, True, seed=0, **aug), ClassificationSet(rows, 32, True, seed=0, **aug)
    plain = ClassificationSet(rows, 32, True, seed=0)
    torch.testing.assert_close(a[0][0], b[0][0])  # same (seed, epoch, index): the same image
    assert not torch.equal(a[0][0], plain[0][0])  # RandAugment + erasing changed it
    b.epoch = 1
    assert not torch.equal(a[0][0], b[0][0])  # a new epoch draws anew


def test_finetune_is_reproducible_with_mixup_randaugment_and_erasing(tmp_path, monkeypatch):
    import numpy as np

    from maelab.transfer.classification import run_finetune

    manifest = _scenes_fixture().make_scenes(tmp_path, n_train=8, n_val=4, size=32)
    monkeypatch.chdir(tmp_path)
    cfg = FineTuneConfig(
        img_size=32,
        batch_size=4,
        steps=3,
        warmup_steps=1,
        blr=1e-3,
        drop_path=0.1,
        mixup=0.8,
        cutmix=1.0,
        smoothing=0.1,
        rand_augment="rand-m9-mstd0.5-inc1",
        erase_prob=0.5,
        device="cpu",
    )
    np.random.seed(123)  # noqa: NPY002
    first = run_finetune(manifest, None, TINY, cfg)
    restored = np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)  # noqa: NPY002
    assert restored  # the node put NumPy's global state back
    second = run_finetune(manifest, None, TINY, cfg)
    assert first["final_loss"] == second["final_loss"] and first["top1"] == second["top1"]


def test_rand_augment_posterize_at_full_magnitude_gives_a_black_image():
    import pandas as pd
    from PIL import Image

    from maelab.transfer.data import ClassificationSet

    rows = pd.DataFrame({"label": [0]})
    ra = ClassificationSet(rows, 32, True, rand_augment="rand-m9-mstd0.5-inc1").rand_augment
    (op,) = [op for op in ra.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0  # 4 - 10/10 * 4 = 0 bits kept
    out = op(Image.new("RGB", (8, 8), (200, 120, 40)))
    assert out.size == (8, 8) and out.getextrema() == ((0, 0), (0, 0), (0, 0))

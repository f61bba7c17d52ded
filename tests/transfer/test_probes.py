import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from maelab.transfer.config import ConfigError, task_config
from maelab.transfer.data import IGNORE_INDEX
from maelab.transfer.probes import (
    LinearSegHead,
    foreground_masks,
    knn_classify,
    over_seeds,
    run_knn_probe,
    run_linear_probe,
    run_seg_probe,
)

_spec = importlib.util.spec_from_file_location("scenes_fixture", Path(__file__).parent / "scenes_fixture.py")
scenes_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenes_fixture)

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def test_knn_classify_votes_for_the_nearest_labels():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=gen) * 4
    train_y = torch.arange(4).repeat(25)
    train_x = centers[train_y] + torch.randn(100, 8, generator=gen)
    test_y = torch.arange(4).repeat(5)
    test_x = centers[test_y] + torch.randn(20, 8, generator=gen)
    scores = knn_classify(train_x, train_y, test_x, 4, k=5)
    assert scores.shape == (20, 4)
    assert (scores.argmax(1) == test_y).float().mean() > 0.9
    # one neighbour: the label of the most similar training feature
    assert knn_classify(train_x, train_y, train_x[:3], 4, k=1).argmax(1).tolist() == train_y[:3].tolist()


def test_over_seeds_reports_mean_std_and_per_seed_values():
    def run(manifest, ref, default, cfg):
        return {"top1": 10.0 + cfg.seed, "pool": "mean", "seconds": 1.0}

    cfg = task_config("knn_probe", {"tasks": {"knn_probe": {"seeds": [0, 1, 2]}}})
    out = over_seeds(run, None, None, {}, cfg)
    assert out["top1"] == 11.0 and out["top1_seeds"] == [10.0, 11.0, 12.0]
    assert out["top1_std"] == pytest.approx(0.816, abs=1e-3)
    assert out["pool"] == "mean" and out["seeds"] == [0, 1, 2]


def test_one_seed_reports_no_spread():
    """A metric from one seed has no standard deviation: no `_std` (a 0.0 would read as a perfect spread)."""

    def run(manifest, ref, default, cfg):
        return {"top1": 10.0 + cfg.seed, "seconds": 1.0}

    cfg = task_config("knn_probe", {"tasks": {"knn_probe": {"seeds": [3]}}})
    out = over_seeds(run, None, None, {}, cfg)
    assert out["top1"] == 13.0 and "top1_std" not in out and "top1_seeds" not in out


def test_linear_seg_head_is_per_token_linear():
    head = LinearSegHead(8, 3).eval()
    x = torch.randn(2, 8, 4, 4)
    out = head(x)
    assert out.shape == (2, 3, 4, 4)
    # a 1x1 conv: each output location depends only on its own token
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0
    changed = (head(x2) - out).abs().sum(1) > 0
    assert changed[:, 0, 0].all() and not changed[:, 1:, :].any() and not changed[:, 0, 1:].any()


def test_foreground_masks_merge_every_class_and_keep_ignored_pixels():
    masks = torch.tensor([[[0, 3, 10], [IGNORE_INDEX, 1, 0]]])
    assert foreground_masks(masks).tolist() == [[[0, 1, 1], [IGNORE_INDEX, 1, 0]]]


def test_fg_probe_is_two_classes_and_refuses_another_count():
    assert task_config("fg_probe", {}).data.num_classes == 2
    with pytest.raises(ConfigError, match=r"fg_probe.data.num_classes: foreground / background is 2 classes"):
        task_config("fg_probe", {"tasks": {"fg_probe": {"data": {"num_classes": 11}}}})
    with pytest.raises(ConfigError, match=r"fg_probe.data.reduce_zero_label: label 0 is the background"):
        task_config("fg_probe", {"tasks": {"fg_probe": {"data": {"reduce_zero_label": True}}}})


def _pretrain(tmp_path: Path, manifest, name: str, **train) -> Path:
    """A tiny MAE pre-training through the real engine; returns its encoder file."""
    from maelab.config import resolve_recipe
    from maelab.train.engine import train as run_train

    params = yaml.safe_load((ROOT / "conf/base/parameters_pretrain.yml").read_text())
    recipe = resolve_recipe(params, "mae")
    recipe["encoder"] = dict(TINY)
    recipe["heads"]["pixel"].update(embed_dim=32, depth=1, num_heads=2)
    recipe["data"].update(num_workers=0, crop_scale=[0.5, 1.0])
    recipe["train"].update(
        steps=120,
        batch_size=16,
        warmup_steps=10,
        blr=4e-2,
        ckpt_every=1000,
        image_every=0,
        log_every=1000,
        **train,
    )
    result = run_train(recipe, manifest, out_dir=tmp_path / name, mlflow={"enabled": False}, progress=False)
    return Path(result.encoder_path)


def test_a_broken_pretraining_scores_like_random_init(tmp_path, monkeypatch):
    """Through the same evaluation code as the report, a broken pre-training (lr ~0: the encoder never moves
    from its initialisation) scores exactly like the random-init row of the same seed, on every probe; a
    working one (same recipe, lr > 0) scores differently.
    At this size the gap is noise-level: the sensitivity of the report is measured on the embedded default
    (README), not here."""
    monkeypatch.chdir(tmp_path)
    manifest = scenes_fixture.make_scenes(tmp_path, n_train=64, n_val=32, size=32)
    working = _pretrain(tmp_path, manifest, "working")
    # broken: lr 1e-30 (the strict schema refuses lr 0). A step moves a weight by about 1e-30, below float32
    # resolution for any non-zero weight, so the encoder stays at its initialisation (zero biases: ~1e-30)
    broken = _pretrain(tmp_path, manifest, "broken", lr=1e-30)
    data = {"sources": ["scenes"], "train_split": "train", "eval_split": "val"}
    cfgs = {
        "linear_probe": (run_linear_probe, "top1", {"pool": "mean", "epochs": 10, "warmup_epochs": 1}),
        "knn_probe": (run_knn_probe, "top1", {"pool": "mean", "k": 5, "standardize": True}),
        "seg_probe": (run_seg_probe, "miou", {"epochs": 5, "batch_size": 16, "lr": 1e-2}),
        "fg_probe": (run_seg_probe, "miou", {"epochs": 5, "batch_size": 16, "lr": 1e-2}),
    }
    for name, (run, key, extra) in cfgs.items():
        extra = {"img_size": 32, "device": "cpu", "batch_size": 32, **extra}
        if name == "seg_probe":
            extra["data"] = {"num_classes": len(scenes_fixture.CATEGORIES) + 1}

        def cfg(seeds, name=name, extra=extra):
            return task_config(name, {"data": data, "tasks": {name: {**extra, "seeds": seeds}}})

        rand = run(manifest, None, TINY, cfg([0, 1, 2]))
        bro = run(manifest, str(broken), TINY, cfg([0, 1, 2]))
        work = run(manifest, str(working), TINY, cfg([0]))
        if name == "knn_probe":  # no randomness but the encoder's: a file encoder is evaluated once
            assert bro["seeds"] == [0] and f"{key}_std" not in bro
            assert bro[key] == rand[f"{key}_seeds"][0], name  # the same encoder as random init 0
        else:
            assert bro[f"{key}_seeds"][0] == rand[f"{key}_seeds"][0], name
        if name in ("seg_probe", "fg_probe"):  # continuous scores: a trained encoder lands elsewhere
            assert work[key] != rand[f"{key}_seeds"][0]

"""Parameter checks of the paper recipes in conf/ (long-seq MAE, R-MAE's deviations, the combinations)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maelab.config import load_config, resolve_recipe
from maelab.masking import build_masker
from maelab.models import build_pretrainer
from maelab.models.compat import IncompatibleRecipeError
from maelab.teachers.build import with_untrained_teachers

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def params():
    return {env: load_config("parameters", env, CONF) for env in (None, "coco", "imagenet")}


def recipe(params, name: str, env: str | None = None) -> dict:
    return resolve_recipe(params[env], name)


def grid(r: dict) -> tuple[int, int]:
    g = r["encoder"]["img_size"] // r["encoder"]["patch_size"]
    return g, g


def kept(r: dict) -> int:
    return build_masker(r["masker"], grid(r))(torch.Generator().manual_seed(0)).num_keep


def effective_batch(r: dict) -> int:
    t = r["train"]
    return t["batch_size"] * t["accum_steps"] * t["devices"]


# -- R-MAE's stated defaults (Nguyen et al. §4.1, App. B) ----------------------------------------------
def test_rmae_pretrains_on_coco_train2017_only(params):
    for name in ("rae", "rmae", "mae_blr1e4", "rmae_block"):
        assert recipe(params, name, "coco")["data"]["splits"] == ["train"], name
    assert recipe(params, "rmae_coco_plus", "coco")["data"]["splits"] == ["train", "unlabeled"]  # its Tab. 3


def test_an_mae_baseline_at_blr_1e4_sits_next_to_rmae(params):
    for env in ("coco", "imagenet"):
        base, rmae = recipe(params, "mae_blr1e4", env), recipe(params, "rmae", env)
        assert base["train"]["blr"] == rmae["train"]["blr"] == 1.0e-4  # Table 7 "MAE w/ 1e-4"
        assert base["heads"]["pixel"] == rmae["heads"]["pixel"]  # the very same pixel branch
        assert base["masker"] == rmae["masker"] and base["data"]["splits"] == rmae["data"]["splits"]
        assert recipe(params, "mae", env)["train"]["blr"] == 1.5e-4  # MAE's own rate is still there
    assert recipe(params, "mae_blr1e4", "imagenet")["train"]["epochs"] == 1600  # Table 7's ImageNet column


# -- long-seq MAE (Hu et al. 2022) ---------------------------------------------------------------------
def test_longseq_448_is_the_papers_default(params):
    r = recipe(params, "longseq_448", "coco")
    assert (r["encoder"]["img_size"], r["encoder"]["patch_size"], r["encoder"]["embed_dim"]) == (448, 16, 768)
    assert grid(r) == (28, 28) and kept(r) == 196  # L = 784, L_e = 196 (Tab. 1)
    assert r["masker"] == {"type": "block", "ratio": 0.75, "block": 2}
    assert r["data"]["sources"] == ["coco"] and r["data"]["splits"] == ["train", "unlabeled"]  # §4.1
    t = r["train"]
    assert (t["epochs"], t["warmup_epochs"], t["blr"]) == (800 * 5, 40 * 5, 1.5e-4)  # 800 / 40 over COCO++ x5
    assert effective_batch(r) == 4096
    pix = r["heads"]["pixel"]  # App. A: half the encoder width, the encoder's heads, 8 blocks
    assert (pix["embed_dim"], pix["num_heads"], pix["depth"]) == (384, 12, 8) and pix["downsample"] == 1
    assert recipe(params, "longseq", "coco") == {**r, "name": "longseq"}


def test_the_mae_baseline_has_the_same_384d_decoder(params):
    for env in ("coco", "imagenet"):
        base, ls = recipe(params, "longseq_baseline", env), recipe(params, "longseq_448", env)
        assert base["heads"] == ls["heads"]
        assert grid(base) == (14, 14) and base["masker"]["type"] == "random" and kept(base) == 49
        assert base["data"]["splits"] == ls["data"]["splits"] and base["train"] == ls["train"]


def test_vit_l_gets_the_512d_16_head_decoder(params):
    for name, img in (("longseq_448_l", 448), ("longseq_baseline_l", 224)):
        r = recipe(params, name, "coco")
        enc, pix = r["encoder"], r["heads"]["pixel"]
        assert (enc["img_size"], enc["embed_dim"], enc["depth"], enc["num_heads"]) == (img, 1024, 24, 16)
        assert (pix["embed_dim"], pix["num_heads"], pix["depth"]) == (512, 16, 8)  # App. A
        assert r["train"] == recipe(params, "longseq_448", "coco")["train"]


def test_imagenet_224_p8_variant(params):
    r = recipe(params, "longseq_224p8", "imagenet")
    assert grid(r) == (28, 28) and r["encoder"]["img_size"] == 224 and kept(r) == 196
    assert r["heads"]["pixel"]["embed_dim"] == 384 and r["train"]["epochs"] == 800
    assert recipe(params, "longseq", "imagenet")["encoder"]["img_size"] == 448


# Table 2: (row, I, p, L, m, L_e, downsample, epochs)
TABLE_2 = [
    ("longseq_2a_p64", 448, 64, 49, 2, 12, 1, 4000),
    ("longseq_2a_p32", 448, 32, 196, 2, 49, 1, 4000),
    ("longseq_2b_i112", 112, 16, 49, 2, 12, 1, 4000),
    ("longseq_2b_i224", 224, 16, 196, 2, 49, 1, 4000),
    ("longseq_2c_i224p8", 224, 8, 784, 2, 196, 1, 4000),
    ("longseq_2c_i672p24", 672, 24, 784, 2, 196, 1, 4000),
    ("longseq_2d_m1", 448, 16, 784, 1, 196, 1, 4000),
    ("longseq_2d_m4", 448, 16, 784, 4, 196, 1, 4000),
    ("longseq_2e_le49", 448, 16, 784, 2, 49, 1, 4000),
    ("longseq_2e_ld196", 448, 16, 784, 2, 196, 2, 4000),
    ("longseq_2f_mae4x", 224, 16, 196, None, 49, 1, 16000),
]


@pytest.mark.parametrize("row", TABLE_2, ids=[r[0] for r in TABLE_2])
def test_table_2_rows(params, row):
    name, img, patch, length, m, le, ds, epochs = row
    r, default = recipe(params, name, "coco"), recipe(params, "longseq_448", "coco")
    assert (r["encoder"]["img_size"], r["encoder"]["patch_size"]) == (img, patch)
    assert grid(r)[0] * grid(r)[1] == length and kept(r) == le
    assert r["masker"].get("block") == m
    assert r["heads"]["pixel"]["downsample"] == ds and r["train"]["epochs"] == epochs
    # everything else is the default row
    same = ("data", "train") if name != "longseq_2f_mae4x" else ("data",)
    assert all(r[k] == default[k] for k in same)
    assert {k: v for k, v in r["heads"]["pixel"].items() if k != "downsample"} == {
        k: v for k, v in default["heads"]["pixel"].items() if k != "downsample"
    }


def test_tiny_longseq_doubles_the_base_resolution(params):
    mae, ls = recipe(params, "mae"), recipe(params, "longseq")
    assert ls["encoder"]["img_size"] == 2 * mae["encoder"]["img_size"]
    assert grid(ls)[0] * grid(ls)[1] == 4 * grid(mae)[0] * grid(mae)[1]
    pix, enc = ls["heads"]["pixel"], ls["encoder"]
    assert pix["embed_dim"] == enc["embed_dim"] // 2 and pix["num_heads"] == enc["num_heads"]
    assert recipe(params, "longseq_baseline")["heads"] == ls["heads"]


# -- combinations ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("env", [None, "coco", "imagenet"])
def test_combinations_resolve_to_consistent_recipes(params, env):
    rb, rl = recipe(params, "rmae_block", env), recipe(params, "rmae_longseq", env)
    ref = recipe(params, "longseq" if env is None else "longseq_448", env)
    for r in (rb, rl):
        assert r["masker"]["type"] == "block" and set(r["heads"]) == {"pixel", "region"}
        assert r["data"]["regions"]["k"] == r["heads"]["region"].get("num_regions", 8)
        assert r["heads"]["region"].get("mask_ratio") is None  # beta_R = beta_I: block plans are not random
    assert rl["encoder"] == ref["encoder"] and rl["heads"]["pixel"] == ref["heads"]["pixel"]
    if env is not None:
        assert rb["train"]["blr"] == rl["train"]["blr"] == 1.0e-4  # R-MAE's rate
        assert rb["heads"]["pixel"]["embed_dim"] == 512  # no tiny value leaks into a paper recipe


def test_tiny_combinations_build_and_a_bad_one_fails_at_start(params):
    for name in ("rmae_block", "rmae_longseq"):
        model = build_pretrainer(recipe(params, name))
        assert type(model.masker).__name__ == "BlockMasker"
    bad = recipe(params, "rmae_block")
    bad["heads"]["region"]["mask_ratio"] = 0.9
    with pytest.raises(IncompatibleRecipeError, match="random_order"):
        build_pretrainer(bad)


def test_mimic_on_rmae_is_rmae_plus_mrmaes_mimic_head(params):
    """MR-MAE's mimic head on R-MAE, from the parts: R-MAE's two branches on one random plan, the mimic head
    and teacher of the mrmae recipe, each paper's weight ratio to the pixel loss (1:1)."""
    r, rmae, mrmae = (recipe(params, n) for n in ("rmae_mimic", "rmae", "mrmae"))
    assert set(r["heads"]) == {"pixel", "region", "mimic"} and r["masker"] == rmae["masker"]
    assert r["data"]["regions"] == rmae["data"]["regions"]
    assert r["heads"]["mimic"] == mrmae["heads"]["mimic"] and r["heads"]["pixel"] == mrmae["heads"]["pixel"]
    region = {k: v for k, v in r["heads"]["region"].items() if k != "weight"}
    assert region == {k: v for k, v in rmae["heads"]["region"].items() if k != "weight"}
    weights = {h["weight"] for h in r["heads"].values()}
    assert weights == {0.5}
    model = build_pretrainer(with_untrained_teachers(r))
    assert {type(h).__name__ for h in model.heads.values()} == {"PixelDecoderHead", "RegionHead", "MimicHead"}


def test_lomar_windows_with_a_region_head_fail_at_start_with_the_reason(params):
    """The issue's bad combination with the real parts: LoMaR's window plans cover n windows of k x k
    tokens, not the patch grid R-MAE's region branch (and MAE's decoder) restore."""
    bad = recipe(params, "lomar")
    bad["data"]["regions"] = {"source": "fh", "k": 8}
    bad["heads"]["region"] = recipe(params, "rmae")["heads"]["region"]
    with pytest.raises(IncompatibleRecipeError) as err:
        build_pretrainer(bad)
    msg = str(err.value)
    assert "recipe lomar: these parts cannot go together" in msg
    assert "heads.region (RegionHead) needs plans with 'full_grid'" in msg and "WindowMasker" in msg
    assert "heads.pixel" not in msg  # the LoMaR head itself is fine with windows


# -- LoMaR (Chen et al. 2022) --------------------------------------------------------------------------
def test_lomar_imagenet_is_the_papers_recipe(params):
    r = recipe(params, "lomar", "imagenet")
    enc, masker, train = r["encoder"], r["masker"], r["train"]
    assert (enc["img_size"], enc["patch_size"], enc["embed_dim"], enc["depth"]) == (
        224,
        16,
        768,
        12,
    )  # ViT-B/16
    assert (masker["type"], masker["window"], masker["views"], masker["ratio"]) == ("window", 7, 4, 0.8)
    assert enc["rel_pos"] == "irpe" and enc["abs_pos"] is False and enc["mask_token"] is True
    assert (train["epochs"], train["warmup_epochs"], train["blr"], train["weight_decay"]) == (
        400,
        20,
        1.5e-4,
        0.05,
    )
    assert effective_batch(r) == 4096
    assert r["heads"]["pixel"]["type"] == "lomar" and r["heads"]["pixel"]["norm_pix_loss"]


@pytest.mark.parametrize(
    "name,env,img,views",
    [
        ("lomar", None, 64, 4),
        ("lomar", "imagenet", 224, 4),
        ("lomar_384", "imagenet", 384, 6),
        ("lomar_448", "imagenet", 448, 9),
        ("lomar_ape", "imagenet", 224, 4),
        ("lomar_p8", "imagenet", 224, 4),
        ("lomar_fig4_mae", "imagenet", 224, 4),
    ],
)
def test_lomar_recipes_build_with_matching_windows(params, name, env, img, views):
    r = recipe(params, name, env)
    assert r["encoder"]["img_size"] == img and r["masker"]["views"] == views  # §2.1: 6 at 384, 9 at 448
    assert r["encoder"]["window_size"] == r["masker"]["window"]
    if env is None:  # the tiny one builds and runs here; the ViT-B ones are built by the flops tests
        model = build_pretrainer(r)
        plan = model.masker(torch.Generator().manual_seed(0))
        assert plan.window_ids.shape == (views, r["masker"]["window"] ** 2)

import argparse
import json

import pytest
import torch

from maelab.analysis.bench import PEAK_BF16_TFLOPS, bench_train, device_peak_tflops, train_cli

TINY = {
    "name": "tiny",
    "encoder": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "masker": {"type": "random", "ratio": 0.75},
    "heads": {"pixel": {"type": "pixel_decoder", "embed_dim": 32, "depth": 1, "num_heads": 2}},
    "train": {"batch_size": 4, "weight_decay": 0.05, "betas": [0.9, 0.95]},
}


def test_two_precisions_side_by_side():
    out = bench_train(TINY, ["fp32", "bf16"], batch_size=4, steps=3, device="cpu", warmup=1)
    assert [r["precision"] for r in out["results"]] == ["fp32", "bf16"]
    for r in out["results"]:
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["peak_mem_mb"] > 10
        assert "mfu" not in r  # only on a GPU
    assert out["batch_size"] == 4 and out["device"].startswith("cpu")


def test_cli_prints_one_json_line(capsys, monkeypatch):
    monkeypatch.setattr("maelab.config.load_recipe", lambda name, env=None: {**TINY, "name": name})
    args = argparse.Namespace(
        recipe="mae", env=None, steps=2, batch_size=2, precision="fp32", device="cpu", json=True
    )
    assert train_cli(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert got["recipe"] == "mae" and got["results"][0]["precision"] == "fp32"


def test_peak_table_prefers_the_specific_name():
    names = list(PEAK_BF16_TFLOPS)
    assert names.index("H100 PCIe") < names.index("H100")
    assert device_peak_tflops(torch.device("cpu")) is None


def test_lomar_against_mae_side_by_side(capsys, monkeypatch):
    lomar = {
        **TINY,
        "name": "lomar",
        "encoder": {
            **TINY["encoder"],
            "img_size": 64,
            "mask_token": True,
            "window_size": 4,
            "rel_pos": "irpe",
        },
        "masker": {"type": "window", "ratio": 0.8, "window": 4, "views": 2},
        "heads": {"pixel": {"type": "lomar"}},
    }
    recipes = {"lomar": lomar, "mae": {**TINY, "name": "mae"}}
    monkeypatch.setattr("maelab.config.load_recipe", lambda name, env=None: recipes[name])
    args = argparse.Namespace(
        recipe="lomar",
        env=None,
        steps=2,
        batch_size=2,
        precision="fp32",
        device="cpu",
        json=True,
        against="mae",
    )
    assert train_cli(args) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["recipe"] for r in got["runs"]] == ["lomar", "mae"] and got["img_size"] == 64  # MAE at 64 too
    ips = [r["results"][0]["images_per_s"] for r in got["runs"]]
    assert got["speedup"]["fp32"] == ips[0] / ips[1]
    cpu = [r["results"][0]["cpu_step_ms"] for r in got["runs"]]
    assert all(c > 0 for c in cpu) and got["speedup_cpu_time"]["fp32"] == cpu[1] / cpu[0]
    cpu = [r["results"][0]["cpu_step_ms_mean"] for r in got["runs"]]
    assert got["speedup_cpu_time_mean"]["fp32"] == cpu[1] / cpu[0]


def test_sgmae_after_its_switch_refreshes_on_the_steps_the_recipe_says(capsys, monkeypatch):
    from maelab.masking.self_guided import SelfGuidedMasker

    sgmae = {
        **TINY,
        "name": "sgmae",
        "masker": {"type": "self_guided", "ratio": 0.75, "monitor_every": 0, "monitor_size": 2},
    }
    monkeypatch.setattr("maelab.config.load_recipe", lambda name, env=None: {**sgmae, "name": name})
    informed_steps = []
    scores = SelfGuidedMasker.scores

    def counted(self, model, images, epoch):
        informed_steps.append(self.refresh_every)
        return scores(self, model, images, epoch)

    monkeypatch.setattr(SelfGuidedMasker, "scores", counted)

    def run(*sets):  # 2 warm-up + 4 timed steps: steps 0..5 of the in-step masker's context
        args = argparse.Namespace(
            recipe="sgmae", env=None, steps=4, batch_size=2, precision="fp32", device="cpu", json=True,
            against=None, sets=["masker.switch_at_step=0", *sets],
        )  # fmt: skip
        assert train_cli(args) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    got = run()
    assert informed_steps == [1] * 6  # after the switch, an informed mask every step
    assert got["results"][0]["images_per_s_mean"] > 0
    informed_steps.clear()
    run("masker.refresh_every=3")
    assert informed_steps == [3, 3]  # steps 0 and 3 only
    args = argparse.Namespace(
        recipe="sgmae", env=None, steps=1, batch_size=2, precision="fp32", device="cpu", json=True,
        against=None, sets=["masker.refresh_evry=3"],
    )  # fmt: skip
    with pytest.raises(Exception, match="refresh_evry"):
        train_cli(args)


def test_variants_checkpointing_and_fsdp_side_by_side():
    from maelab.analysis.bench import parse_variant
    from maelab.train import distributed

    assert parse_variant("bf16+compile+ac=selective+fsdp") == (
        "bf16",
        {"compile": True, "activation_checkpointing": "selective", "strategy": "fsdp"},
    )
    try:
        out = bench_train(
            TINY, ["fp32", "fp32+ac=full", "fp32+fsdp"], batch_size=2, steps=2, device="cpu", warmup=1
        )
    finally:
        distributed.cleanup()  # the one-process FSDP group
    assert [r["precision"] for r in out["results"]] == ["fp32", "fp32+ac=full", "fp32+fsdp"]
    assert all(r["images_per_s"] > 0 and r["first_step_s"] > 0 for r in out["results"])

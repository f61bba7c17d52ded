import hashlib

import pytest
import torch
from fake_parts import build_pretrainer, tiny_recipe
from safetensors.torch import load_file

from maelab.train.checkpoint import load_checkpoint
from maelab.train.engine import CHECKPOINT, NonFiniteLossError, train

OFF = {"enabled": False}


def run(recipe, manifest, out, **kw):
    kw.setdefault("build_model", build_pretrainer)
    return train(recipe, manifest, out_dir=out, mlflow=OFF, progress=False, **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical(manifest, tmp_path, workers):
    recipe = tiny_recipe(steps=6, ckpt_every=2)
    recipe["data"]["num_workers"] = workers
    full = run(recipe, manifest, tmp_path / "full")
    part = run(recipe, manifest, tmp_path / "part", stop_after=3)  # crosses an epoch (3 batches/epoch)
    assert part.steps == 3 and part.encoder_path is None
    rest = run(recipe, manifest, tmp_path / "part", resume=True)
    assert rest.start_step == 3 and rest.steps == 6
    assert full.history["loss"] == rest.history["loss"]  # exact floats, all 6 steps
    a = load_checkpoint(tmp_path / "full" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "part" / CHECKPOINT)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["data"] == b["data"] == {"epoch": 2, "batch": 0, "consumed": 6}
    ea, eb = load_file(full.encoder_path), load_file(rest.encoder_path)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert all(k.startswith(("embed", "pos", "norm", "mlp")) for k in ea)  # the encoder only


def test_accumulation_matches_one_big_batch(manifest, tmp_path):
    # the sampler cuts the same per-epoch permutation: 2 micro-batches of 2 == 1 batch of 4
    run(tiny_recipe(steps=3, batch_size=4, lr=1e-3), manifest, tmp_path / "a")
    run(tiny_recipe(steps=3, batch_size=2, accum_steps=2, lr=1e-3), manifest, tmp_path / "b")
    a = load_checkpoint(tmp_path / "a" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "b" / CHECKPOINT)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-6, rtol=0, msg=k)
    assert a["history"]["lr"] == b["history"]["lr"]
    assert b["data"]["consumed"] == 6 and a["data"]["consumed"] == 3


def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(manifest, tmp_path):
    recipe = tiny_recipe(steps=6, ckpt_every=2)
    recipe["fake_nan_at"] = 4  # the 4th forward, i.e. step index 3
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 \(heads: pixel=nan\)"):
        run(recipe, manifest, out)
    ckpt = out / CHECKPOINT
    digest = hashlib.sha1(ckpt.read_bytes()).hexdigest()
    state = load_checkpoint(ckpt)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not list(out.glob(".*tmp*"))  # no half-written files
    # the failed run did not touch it
    assert hashlib.sha1(ckpt.read_bytes()).hexdigest() == digest


def test_bf16_autocast_runs_on_cpu(manifest, tmp_path):
    r = run(tiny_recipe(steps=2, precision="bf16"), manifest, tmp_path / "bf16")
    assert r.precision == "bf16" and all(torch.isfinite(torch.tensor(r.history["loss"])))


def test_the_models_masker_gets_the_step_epoch_and_length(manifest, tmp_path):
    """One masker per run: the dataset draws with the model's own masker, told where training stands."""
    seen = []
    model = build_pretrainer(tiny_recipe())
    draw = model.masker

    class Recording:
        in_step = False

        def __call__(self, generator=None, context=None):
            seen.append((context.step, context.epoch, context.total_steps))
            return draw(generator, context)

    model.masker = Recording()
    recipe = tiny_recipe(steps=4, batch_size=2, accum_steps=2)  # 12 images: 6 micro-batches an epoch
    run(recipe, manifest, tmp_path / "out", build_model=lambda r: model)
    # 4 steps x 2 micro-batches x 2 samples; step = micro-batch // accum; epoch changes after 6 micro-batches
    assert seen == [(m // 2, m // 6, 4) for m in range(8) for _ in range(2)]


def test_a_fresh_run_sets_an_earlier_checkpoint_aside(manifest, tmp_path):
    """Run A finishes; fresh run B dies before its first checkpoint; a resume then starts from step 0
    (B's own progress: none), not from A's last step."""
    out = tmp_path / "same"
    run(tiny_recipe(steps=4, ckpt_every=2), manifest, out)
    assert load_checkpoint(out / CHECKPOINT)["step"] == 4
    dying = tiny_recipe(steps=4, ckpt_every=2)
    dying["fake_nan_at"] = 2  # the 2nd forward: before B's first checkpoint
    with pytest.raises(NonFiniteLossError):
        run(dying, manifest, out)
    assert not (out / CHECKPOINT).exists() and load_checkpoint(out / "checkpoint.previous.pt")["step"] == 4
    resumed = train(
        tiny_recipe(steps=4, ckpt_every=2),
        manifest,
        out_dir=out,
        resume=True,
        build_model=build_pretrainer,
        progress=False,
    )
    assert resumed.start_step == 0 and resumed.steps == 4

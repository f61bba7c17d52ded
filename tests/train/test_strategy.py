"""Training strategies on CPU with gloo: FSDP2 equals one process, DCP checkpoints move between world sizes
and strategies, activation checkpointing leaves gradients unchanged, keys carry no wrapper prefixes."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from fake_parts import real_worker, tiny_recipe
from safetensors.torch import load_file

from maelab.models import build_pretrainer
from maelab.train import distributed
from maelab.train.checkpoint import CHECKPOINT_DCP, TRAIN_STATE, load_checkpoint
from maelab.train.engine import CHECKPOINT, ENCODER, RESULT, train
from maelab.train.strategy import apply_activation_checkpointing, blocks_of, compile_model, strip_prefixes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe(batch_size: int, **train: object) -> dict:
    return tiny_recipe(steps=4, batch_size=batch_size, lr=None, blr=0.064, ckpt_every=2, **train)


def one_process(rec: dict, out, **kw: object):
    try:
        return train(rec, kw.pop("manifest"), out_dir=out, mlflow={"enabled": False}, progress=False, **kw)
    finally:
        distributed.cleanup()  # a one-process FSDP run makes its own group


def two_ranks(manifest, rec: dict, out, resume: bool = False, stop_after: int | None = None) -> None:
    args = (2, free_port(), manifest, rec, str(out), resume, stop_after)
    mp.spawn(real_worker, args=args, nprocs=2, join=True)


def assert_same_weights(a: dict, b: dict) -> None:
    # 1e-4: AdamW turns fp32 noise in a zero gradient (e.g. a key bias, which softmax ignores) into a step
    # of up to lr (1e-3 here); a weight or optimiser state not loaded is off by ~lr or more
    assert sorted(a) == sorted(b)
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.distributed
def test_fsdp_two_ranks_and_dcp_resume_across_world_sizes_match_one_process(manifest, tmp_path):
    # reference: one process, batch 4 (two ranks x batch 2 see the same global batches), DDP strategy, file
    ref = one_process(recipe(4), tmp_path / "ref", manifest=manifest)
    ref_ckpt = load_checkpoint(tmp_path / "ref" / CHECKPOINT)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ref_ckpt["model"])
    report = json.loads((tmp_path / "ref" / RESULT).read_text())
    assert report["data_wait_ms"] >= 0 and report["step_ms"] > 0 and report["tflops"] > 0
    assert "mfu" not in report  # MFU only where the device peak is known (CUDA)

    # FSDP2 on two ranks, stopped at step 2: a DCP folder each rank wrote its shards into
    two_ranks(manifest, recipe(2, strategy="fsdp"), tmp_path / "a", stop_after=2)
    state = load_checkpoint(tmp_path / "a" / CHECKPOINT_DCP / TRAIN_STATE)
    assert state["world_size"] == 2 and state["step"] == 2
    assert state["history"]["loss"] == pytest.approx(ref.history["loss"][:2], abs=1e-5)
    # ... resumed on one process under DDP (file format): the same run as the reference
    resumed = one_process(recipe(4), tmp_path / "a", manifest=manifest, resume=True)
    assert resumed.start_step == 2
    assert resumed.history["loss"] == pytest.approx(ref.history["loss"], abs=1e-5)
    assert_same_weights(ref_ckpt["model"], load_checkpoint(tmp_path / "a" / CHECKPOINT)["model"])

    # the reverse: one process writes DCP at step 2, FSDP2 on two ranks resumes and finishes
    one_process(recipe(4, checkpoint_format="dcp"), tmp_path / "b", manifest=manifest, stop_after=2)
    two_ranks(manifest, recipe(2, strategy="fsdp", checkpoint_format="file"), tmp_path / "b", resume=True)
    done = load_checkpoint(tmp_path / "b" / CHECKPOINT)
    assert done["world_size"] == 2 and done["step"] == 4
    assert done["history"]["loss"] == pytest.approx(ref.history["loss"], abs=1e-5)
    assert_same_weights(ref_ckpt["model"], done["model"])  # gathered from the FSDP shards, bare keys
    # the safetensors encoder export, gathered from the shards too
    assert_same_weights(load_file(tmp_path / "ref" / ENCODER), load_file(tmp_path / "b" / ENCODER))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    from maelab.masking.plan import MaskPlan

    def grads(ac: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_pretrainer(tiny_recipe())
        assert apply_activation_checkpointing(model, ac) == (0 if ac == "none" else len(blocks_of(model)))
        g = torch.Generator().manual_seed(1)
        batch = {
            "image": torch.randn(3, 3, 32, 32, generator=g),
            "plan": MaskPlan.collate([model.masker(g) for _ in range(3)]),
        }
        model(batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads("none"), grads(mode)
    assert sorted(plain) == sorted(checkpointed)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointing_and_compile_keep_the_state_dict_keys():
    model = build_pretrainer(tiny_recipe())
    keys = list(model.state_dict())
    apply_activation_checkpointing(model, "selective")
    assert compile_model(model) == ["encoder", "heads.pixel"]
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        apply_activation_checkpointing(model, "some")


def test_strip_prefixes_removes_wrapper_names_only():
    state = {"module.encoder._orig_mod.blocks.0.w": 1, "encoder.submodule.w": 2}
    assert strip_prefixes(state) == {"encoder.blocks.0.w": 1, "encoder.submodule.w": 2}

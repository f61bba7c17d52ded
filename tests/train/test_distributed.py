import socket

import pytest
import torch
import torch.multiprocessing as mp
from fake_parts import build_pretrainer, ddp_worker, tiny_recipe

from maelab.train.checkpoint import load_checkpoint
from maelab.train.engine import CHECKPOINT, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_gloo_ddp_matches_one_process_on_the_same_global_batch(manifest, tmp_path):
    steps = 3
    # one process, batch 4 == two ranks x batch 2: the sampler shards the same permutation
    one = tiny_recipe(steps=steps, batch_size=4, accum_steps=1, lr=None, blr=0.064)
    train(
        one,
        manifest,
        out_dir=tmp_path / "one",
        mlflow={"enabled": False},
        build_model=build_pretrainer,
        progress=False,
    )
    two = tiny_recipe(steps=steps, batch_size=2, accum_steps=1, lr=None, blr=0.064)  # same lr: 0.064*4/256
    mp.spawn(ddp_worker, args=(2, free_port(), manifest, two, str(tmp_path / "two")), nprocs=2, join=True)
    a = load_checkpoint(tmp_path / "one" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "two" / CHECKPOINT)
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-6, rtol=0, msg=k)
    assert a["history"]["loss"] == pytest.approx(b["history"]["loss"], abs=1e-6)
    assert a["history"]["lr"] == b["history"]["lr"]

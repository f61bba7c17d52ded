"""Two "nodes" on one machine: two separate ``torchrun`` launchers (c10d rendezvous), each with its own
``--node-rank`` and loopback address (127.0.0.1, 127.0.0.2), one process each; the DDP result equals
one process on the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from fake_parts import tiny_recipe

from maelab.train.checkpoint import load_checkpoint
from maelab.train.engine import CHECKPOINT, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(node_rank: int, port: int, recipe_file, manifest_file, out) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        f"--node-rank={node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=maelab-two-nodes",
        f"--local-addr=127.0.0.{node_rank + 1}",
        "--max-restarts=0",
        "-m",
        "maelab.train",
        *("--recipe-file", str(recipe_file), "--manifest", str(manifest_file)),
        *("--out-dir", str(out), "--no-mlflow"),
    ]
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.distributed
def test_two_torchrun_nodes_on_loopback_match_one_process(manifest, tmp_path):
    steps = 3
    one = tiny_recipe(steps=steps, batch_size=4, lr=None, blr=0.064, ckpt_every=0)
    train(one, manifest, out_dir=tmp_path / "one", mlflow={"enabled": False}, progress=False)

    two = tiny_recipe(steps=steps, batch_size=2, lr=None, blr=0.064, ckpt_every=0)  # 2 nodes x batch 2
    (recipe_file := tmp_path / "recipe.json").write_text(json.dumps(two))
    manifest.to_parquet(manifest_file := tmp_path / "manifest.parquet")
    port = free_port()
    nodes = [launcher(r, port, recipe_file, manifest_file, tmp_path / "two") for r in (0, 1)]
    logs = []
    for node in nodes:
        try:
            out, _ = node.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for n in nodes:
                n.kill()
            raise
        logs.append(out)
    assert [n.returncode for n in nodes] == [0, 0], "\n\n".join(log[-3000:] for log in logs)

    a = load_checkpoint(tmp_path / "one" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "two" / CHECKPOINT)
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    assert a["history"]["loss"] == pytest.approx(b["history"]["loss"], abs=1e-6)
    # 1e-4: AdamW turns fp32 noise in a zero gradient (the key bias, which softmax ignores) into a step of
    # up to lr (1e-3); a rank that trained on other data or missed a gradient sync is off by far more
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")

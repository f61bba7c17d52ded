"""Files, one helper per job: write atomically; read weights and their metadata.

Writes go to a private temp file beside the target (``.tmp-<pid>-<thread>-<name>``, which the region
store's ``gc`` also sweeps) and are renamed onto it, so a reader never sees half a file and a crash
leaves the old file whole. Weights are data: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TMP_PREFIX = ".tmp-"


def temp_path(path: Path) -> Path:
    """A private temp name next to ``path``, unique per process and thread."""
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{path.name}")


def atomic_write(path: str | Path, write: Callable[[Path], Any], fsync: bool = False) -> Path:
    """``write(tmp)``, optionally fsync it, then rename it onto ``path`` (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A weights file's state dict and metadata: safetensors (metadata from its header) or a torch
    checkpoint (metadata ``{}``; a ``"model"`` or ``"state_dict"`` entry is unwrapped, as in training
    checkpoints and MAE's). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta, state = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        else:
            meta, state = {}, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled code, ...
        raise ValueError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from err
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: field 'model' (or the top level) is not a mapping of names to tensors")
    return dict(state), meta


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def metadata_encoder_config(meta: Mapping[str, str], path: str | Path) -> dict[str, Any] | None:
    """The ``encoder_config`` JSON of a weights file's metadata (what pre-training writes), or None."""
    if "encoder_config" not in meta:
        return None
    try:
        return json.loads(meta["encoder_config"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata field 'encoder_config' is not JSON: {err}") from None

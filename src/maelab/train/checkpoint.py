"""Checkpoints are data: tensors and plain python values, saved atomically (tmp + ``os.replace``, mode
0644) and loaded with ``torch.load(weights_only=True)``. The encoder is also exported as safetensors, with
its header (tensor entries and metadata) in sorted order so identical weights give identical bytes.

Temp files are named ``.<name>.tmp<pid>``; :func:`remove_stale_temps` deletes those a killed run left."""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

TMP_MARK = ".tmp"  # temp files: f".{name}{TMP_MARK}{pid}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, cuda, numpy, python) as weights_only-safe values."""
    np_state = np.random.get_state()  # noqa: NPY002 (the legacy global RNG is what we save)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np_state = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    np.random.set_state(np_state)  # noqa: NPY002
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # readable like any output, whatever the writer's default
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files (``.<name>.tmp<pid>``) that killed runs left in ``folder``; call it only while
    holding the folder's lock (no live writer). Returns what was removed."""
    folder = Path(folder)
    removed = []
    for f in folder.glob(f".*{TMP_MARK}*") if folder.is_dir() else ():
        if f.is_file() and f.name.rsplit(TMP_MARK, 1)[-1].isdigit():
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    return _atomic(Path(path), lambda tmp: torch.save(state, tmp))


def torch_load_weights(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU; a file holding arbitrary Python objects is refused with our
    own message (torch's suggests ``weights_only=False``, which would run code from the file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: holds Python objects beyond tensors and plain values; maelab loads weights with "
            "weights_only=True and never unpickles code (save a state dict, or use safetensors)"
        ) from None


def load_checkpoint(path: str | Path, required: Iterable[str] = ()) -> dict[str, Any]:
    """A checkpoint dict; ``required`` keys must be present (the error names the key and the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    try:
        state = torch_load_weights(path)
    except ValueError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable maelab checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint has no {missing[0]!r} key (needed to resume: {list(required)})")
    return state


def safetensors_sorted(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """safetensors bytes with a sorted, compact header: the library writes its header from hash maps, so
    the same weights and metadata can come out in different byte orders. Offsets are relative to the data
    section, which is unchanged, so reordering the JSON header is safe."""
    blob = safetensors_bytes(tensors, metadata=dict(sorted((metadata or {}).items())) or None)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


def save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return _atomic(Path(path), lambda tmp: Path(tmp).write_bytes(safetensors_sorted(flat, metadata)))

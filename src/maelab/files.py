"""Files, one helper per job: write atomically; write and read weights and their metadata.

Writes go to a private temp file beside the target (``.tmp-<pid>-<thread>-<name>``, which the region
store's ``gc`` and :func:`remove_stale_temps` sweep) and are renamed onto it with mode 0644, so a reader
never sees half a file and a crash leaves the old file whole. Weights are data: safetensors (with a
sorted header, so identical weights give identical bytes), or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(rf"{re.escape(TMP_PREFIX)}\d+-\d+-.+")


def temp_path(path: Path) -> Path:
    """A private temp name next to ``path``, unique per process and thread."""
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{path.name}")


def atomic_write(path: str | Path, write: Callable[[Path], Any], fsync: bool = False) -> Path:
    """``write(tmp)``, optionally fsync it, then rename it onto ``path`` with mode 0644 (readable like any
    output, whatever the writer's default); parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
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


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files (``.tmp-<pid>-<thread>-<name>``) that killed writers left in ``folder``; call
    it only while holding the folder's lock (no live writer). Returns what was removed."""
    folder = Path(folder)
    removed = []
    for f in folder.glob(f"{TMP_PREFIX}*") if folder.is_dir() else ():
        if f.is_file() and _TEMP_NAME.fullmatch(f.name):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def safetensors_sorted(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None) -> bytes:
    """safetensors bytes with a sorted, compact header: the library writes its header from hash maps, so
    the same weights and metadata can come out in different byte orders. Offsets are relative to the data
    section, which is unchanged, so reordering the JSON header is safe."""
    from safetensors.torch import save

    blob = save(dict(tensors), metadata=dict(sorted((metadata or {}).items())) or None)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


def save_safetensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Tensors (copied to contiguous CPU memory) and string metadata as a safetensors file, atomically."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return atomic_write_bytes(path, safetensors_sorted(flat, metadata))


def torch_load_weights(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU; a file holding arbitrary Python objects is refused with our
    own message (torch's suggests ``weights_only=False``, which would run code from the file); any other
    failure (truncated, foreign file) is a ``ValueError`` naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: holds Python objects beyond tensors and plain values; maelab loads weights with "
            "weights_only=True and never unpickles code (save a state dict, or use safetensors)"
        ) from None
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from err


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A weights file's state dict and metadata: safetensors (metadata from its header) or a torch
    checkpoint (metadata ``{}``; a ``"model"`` or ``"state_dict"`` entry is unwrapped, as in training
    checkpoints and MAE's). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta, state = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as err:  # corrupt file
            raise ValueError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from err
    else:
        meta, state = {}, torch_load_weights(path)
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

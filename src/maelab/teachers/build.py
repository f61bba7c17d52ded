"""Teachers from recipe data: ``build_teacher({"type": ..., "weights": ..., ...})``.

Types: ``clip`` (open_clip, default model ``ViT-B-16``), ``dino`` (timm, default
``vit_base_patch16_224.dino``), ``maelab`` (a maelab encoder's safetensors). ``weights`` is

- a local file (relative paths from the project root): loaded;
- ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/...``: an MLflow registry URI, resolved to a
  local file *before* the model is built (``maelab.orchestration.teachers.resolve_teacher_weights``; the
  pretrain node, ``maelab flops`` and ``maelab bench`` do it), so the engine never talks to the registry;
- ``random``: untrained, for FLOP counts and speed benchmarks only.

Anything else (an open_clip pretrained tag such as ``openai``, ``hf-hub:...``, ``timm/...``, a URL) would be
a hub download, which maelab never makes at run time: it fails at once, naming the setting to use instead.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from maelab.paths import project_root
from maelab.teachers.base import Teacher
from maelab.teachers.clip import ClipTeacher
from maelab.teachers.dino import DinoTeacher
from maelab.teachers.encoder import EncoderTeacher

log = logging.getLogger(__name__)

TEACHERS: dict[str, type[Teacher]] = {"clip": ClipTeacher, "dino": DinoTeacher, "maelab": EncoderTeacher}
REGISTRY_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
RANDOM = "random"


class HubDownloadError(ValueError):
    """A teacher's weights name a hub download; maelab loads weights from local files or the registry only."""


def local_weights(weights: Any, where: str = "teacher.weights") -> str | None:
    """``weights`` as a local file path (None for ``random``); a registry URI that was not resolved, a
    missing file or a hub name raise, naming ``where``."""
    if weights is None:
        raise ValueError(
            f"{where} is not set: give a local weights file, a registry URI (models:/NAME@ALIAS) or "
            f"'{RANDOM}' (untrained, for FLOP counts and benchmarks only)"
        )
    ref = str(weights).strip()
    if ref == RANDOM:
        return None
    if ref.startswith(REGISTRY_SCHEMES):
        raise ValueError(
            f"{where} = {ref!r} is a registry URI: resolve it to a local file first "
            "(maelab.orchestration.teachers.resolve_teacher_weights; the pretrain node does this)"
        )
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = project_root() / path  # recipes name files relative to the project, as data paths
    if path.is_file():
        return str(path)
    if ref.startswith(("http://", "https://", "hf-hub:", "hf_hub:", "timm/")) or (
        "/" not in ref and not path.suffix
    ):
        raise HubDownloadError(
            f"{where} = {ref!r} names a hub download (a pretrained tag, hub id or URL); maelab downloads "
            f"nothing at run time. Download the checkpoint yourself and set {where} to its local file path, "
            "or to a registry URI models:/NAME@ALIAS"
        )
    raise FileNotFoundError(f"{where} = {ref!r}: no such file ({path})")


def with_untrained_teachers(recipe: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``recipe`` whose teachers are untrained (``weights: random``) at the same architecture:
    what FLOP counts and speed benchmarks need (weights change neither). A maelab-encoder teacher named by a
    registry URI has no architecture in the recipe: it becomes the recipe's own encoder config."""
    recipe = copy.deepcopy(recipe)
    for head in (recipe.get("heads") or {}).values():
        teacher = head.get("teacher") if isinstance(head, dict) else None
        if isinstance(teacher, dict):
            if teacher.get("type") == "maelab" and "config" not in teacher:
                teacher["config"] = dict(recipe["encoder"])
            teacher["weights"] = RANDOM
    return recipe


def build_teacher(cfg: dict[str, Any], where: str = "teacher") -> Teacher:
    """A frozen teacher from ``cfg`` (``type``, ``weights``, and the type's own keys: ``model``,
    ``model_kwargs``, ``projection`` for clip; ``config`` for an untrained maelab encoder)."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"{where}: needs a 'type' (one of {sorted(TEACHERS)}), got {cfg!r}")
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind not in TEACHERS:
        raise ValueError(f"{where}.type {kind!r} is unknown; choose one of {sorted(TEACHERS)}")
    weights = local_weights(cfg.pop("weights", None), f"{where}.weights")
    if weights is None:
        log.warning("%s: an UNTRAINED %s teacher (weights: random), fit for FLOP counts only", where, kind)
    try:
        return TEACHERS[kind](weights=weights, **cfg)
    except TypeError as err:
        raise ValueError(f"{where} ({kind}): bad field in {cfg}: {err}") from err

"""The allowed parameter keys and ranges, in one place: a misspelt key fails at once, naming the key.

Checked here: the top-level parameter sections, ``pretrain``, every recipe (``recipe_defaults`` merged with
``recipes.<name>``: ``encoder``, ``masker``, ``heads``, ``data``, ``train``) and ``ingest`` (its sources by
``type``). Fixed sections are pydantic models with ``extra="forbid"``; blocks whose keys depend on a
``type`` (masker, heads, encoder) are checked against the constructor of the class that ``type`` picks.
Transfer, regions, report, interactive and compare settings are checked by their own code.

:func:`check_parameters` runs on the whole parameter tree (a Kedro hook, before any node);
:func:`check_recipe` runs on one resolved recipe (``python -m maelab.train`` after ``--set``).
Both raise :class:`ConfigError` such as ``recipe 'mae': train.stepz: unknown key (allowed: ...)``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

TOP_LEVEL = (
    "pretrain",
    "recipe_defaults",
    "recipes",
    "ingest",
    "regions",
    "teachers",
    "transfer",
    "report",
    "interactive",
    "rmae_full",
    "compare",
)
RECIPE_SECTIONS = ("name", "encoder", "masker", "heads", "data", "train", "fusion_layers")


class ConfigError(ValueError):
    """A parameter that is unknown or out of range; the message names it by its dotted path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class TrainConfig(_Strict):
    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    accum_steps: int = Field(1, ge=1)
    blr: float | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    warmup_epochs: int | None = Field(None, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = Field(None, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    checkpoint_format: Literal["file", "dcp"] | None = None  # None: dcp under fsdp, file under ddp
    device: str | None = "auto"
    devices: Annotated[int, Field(ge=1)] | Literal["auto"] = 1  # auto: every visible GPU (1 on a CPU)
    seed: int = Field(0, ge=0)
    resume: bool = False
    # a full pre-training state to continue from: models:/NAME@ALIAS (resolved by the caller) or a file
    init_from: str | None = None
    init_from_uri: str | None = None  # set by the caller: the URI init_from was resolved from
    ckpt_every: int | None = Field(None, ge=0)
    log_every: int = Field(10, ge=1)
    image_every: int | None = Field(None, ge=0)
    out_dir: str | None = None
    find_unused_parameters: bool = False


class RegionsData(_Strict):
    source: str = "fh"
    store: str | None = None
    k: int = Field(8, ge=1)
    min_patches: int = Field(1, ge=0)
    replacement: bool = True
    fallback: str = "full"
    key: str | None = None


class TeacherData(_Strict):
    """MR-MAE teacher features: ``online`` (the teacher runs in the step, the default) or ``store`` (read
    from the ``teachers`` pipeline's store with the view's crop and flip; see maelab.teachers.store)."""

    mode: Literal["online", "store"] = "online"
    source: str | None = None  # the store's teacher (teachers.teachers.<name>); needed in store mode
    store: str | None = None  # the store folder; the pretrain node sets it from the teacher_store dataset
    head: str | None = None  # the head whose teacher the store replaces; default: the only head with one


class DataConfig(_Strict):
    manifest: str = "data/02_intermediate/manifest.parquet"
    sources: list[str] | None = None
    splits: list[str] | None = None
    crop_scale: tuple[float, float] = (0.2, 1.0)
    num_workers: int = Field(0, ge=0)
    decode: Literal["full", "crop"] = "full"
    shards: str | None = None
    regions: RegionsData | None = None
    teacher: TeacherData | None = None


class MaskerRange(BaseModel):
    """Ranges of the keys every masker shares (its constructor says which other keys exist)."""

    model_config = ConfigDict(extra="ignore")
    ratio: float = Field(0.75, gt=0.0, lt=1.0)


class EncoderRange(BaseModel):
    """Types and ranges of the encoder keys (its constructor says which keys exist)."""

    model_config = ConfigDict(extra="ignore")
    img_size: int | tuple[int, int] = 224
    patch_size: int = Field(16, ge=1)
    in_chans: int = Field(3, ge=1)
    embed_dim: int = Field(768, ge=1)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    qkv_bias: bool = True
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    fused_attn: bool = True


class PretrainSection(_Strict):
    recipe: str = "mae"


# ingest: keys every source takes, then the keys of each type
_SOURCE_COMMON = {"type", "root", "name", "splits"}
_SOURCE_KEYS: dict[str, set[str]] = {
    "scenes": set(),  # + ScenesConfig fields, added lazily
    "coco": {"year", "panoptic"},
    "lvis": {"annotations", "files"},
    "imagefolder": {"split_dirs", "class_names"},
    "ade20k": set(),
    "flowers102": {"class_names"},
    "photos": {"split", "skimage"},
}


class ShardsSection(_Strict):
    dir: str = "data/02_intermediate/shards"
    images_per_shard: int = Field(1000, ge=1)


class IngestSection(_Strict):
    workers: int = Field(2, ge=0)
    min_side: int = Field(16, ge=1)
    cache: str | None = None
    max_file_mb: int | None = Field(None, ge=1)
    max_decode_mb: int | None = Field(None, ge=1)
    shards: ShardsSection | None = None  # pack the manifest's images into tar shards (data.shards)
    sources: list[dict[str, Any]] = Field(min_length=1)


# ------------------------------------------------------------------------------------------- checks
def _fail(where: str, key: str, what: str) -> None:
    raise ConfigError(f"{where}: {key}: {what}")


def _unknown(where: str, key: str, allowed: list[str]) -> None:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    _fail(where, key, f"unknown key{hint} (allowed: {', '.join(sorted(allowed))})")


def _model(model: type[BaseModel], value: Any, where: str, prefix: str) -> BaseModel:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        _fail(where, prefix, f"expected a mapping, got {type(value).__name__}")
    try:
        return model.model_validate(dict(value))
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join([prefix, *(str(p) for p in e["loc"])])
        if e["type"] == "extra_forbidden":
            top = model
            for part in e["loc"][:-1]:  # nested model (e.g. data.regions): list its own keys
                ann = top.model_fields[str(part)].annotation
                top = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)), top)
            _unknown(where, key, list(top.model_fields))
        allowed = _range(model, e["loc"])
        _fail(where, key, f"{e['msg']}, got {e.get('input')!r}{f' (allowed: {allowed})' if allowed else ''}")
    raise AssertionError  # unreachable


def _range(model: type[BaseModel], loc: tuple) -> str:
    """``[1, inf)`` / ``(0, 1)`` from a field's ge/gt/le/lt constraints ("" when it has none)."""
    field = model.model_fields.get(str(loc[0])) if loc else None
    if field is None or len(loc) != 1:
        return ""
    lo = hi = None
    left, right = "(", ")"
    for m in field.metadata:
        for attr, is_lo, closed in (
            ("ge", True, True),
            ("gt", True, False),
            ("le", False, True),
            ("lt", False, False),
        ):
            v = getattr(m, attr, None)
            if v is None:
                continue
            if is_lo:
                lo, left = v, "[" if closed else "("
            else:
                hi, right = v, "]" if closed else ")"
    if lo is None and hi is None:
        return ""
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def _constructor_keys(cls: Callable[..., Any], skip: int) -> list[str]:
    """The keyword arguments ``cls(...)`` takes after the first ``skip``; a class whose ``__init__`` passes
    ``**kwargs`` on to its base (e.g. a head that extends the pixel decoder) also takes the base's keys."""
    params = list(inspect.signature(cls).parameters.values())[skip:]
    keys = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if inspect.isclass(cls) and any(p.kind is p.VAR_KEYWORD for p in params):
        base = next((b for b in cls.__mro__[1:] if "__init__" in vars(b)), None)
        if base is not None and base is not object:
            keys += [k for k in _constructor_keys(base, skip) if k not in keys]
    return keys


def _typed_block(
    where: str, prefix: str, cfg: Any, registry: Mapping[str, type], skip: int, reserved: tuple[str, ...]
) -> None:
    """``{type: NAME, ...}``: ``type`` must be registered; the other keys, constructor arguments."""
    if not isinstance(cfg, Mapping):
        _fail(where, prefix, f"expected a mapping, got {type(cfg).__name__}")
    kind = cfg.get("type")
    if kind not in registry:
        _fail(where, f"{prefix}.type", f"{kind!r} is unknown; choose one of {sorted(registry)}")
    allowed = _constructor_keys(registry[kind], skip) + list(reserved)
    for key in cfg:
        if key not in allowed:
            _unknown(where, f"{prefix}.{key}", allowed)


def check_recipe(recipe: Mapping[str, Any], where: str | None = None, components: bool = True) -> None:
    """Every key of a resolved recipe is known and in range; raises :class:`ConfigError` naming it.
    ``components=False`` checks only ``train`` and ``data``: a caller that builds its own model and masker
    (tests, experiments) may give them keys of their own."""
    where = where or f"recipe {recipe.get('name', '?')!r}"
    if components:
        for key in recipe:
            if key not in RECIPE_SECTIONS:
                _unknown(where, str(key), list(RECIPE_SECTIONS))
    _model(TrainConfig, recipe.get("train"), where, "train")
    _model(DataConfig, recipe.get("data"), where, "data")
    if components:
        _check_components(recipe, where)


def _check_components(recipe: Mapping[str, Any], where: str) -> None:
    from maelab.masking.maskers import MASKERS
    from maelab.models.heads import HEADS, RESERVED_KEYS
    from maelab.models.vit import ViTEncoder

    encoder = recipe.get("encoder") or {}
    if not isinstance(encoder, Mapping):
        _fail(where, "encoder", f"expected a mapping, got {type(encoder).__name__}")
    allowed = _constructor_keys(ViTEncoder, 0)
    for key in encoder:
        if key not in allowed:
            _unknown(where, f"encoder.{key}", allowed)
    _model(EncoderRange, encoder, where, "encoder")
    masker = {"type": "random", **(recipe.get("masker") or {})}
    _typed_block(where, "masker", masker, MASKERS, 1, ("type",))
    _model(MaskerRange, masker, where, "masker")
    heads = recipe.get("heads") or {}
    if not isinstance(heads, Mapping):
        _fail(where, "heads", f"expected a mapping of head name -> block, got {type(heads).__name__}")
    for name, cfg in heads.items():
        _typed_block(where, f"heads.{name}", cfg, HEADS, 1, RESERVED_KEYS)


def check_ingest(ingest: Any, where: str = "parameters_ingest.yml") -> None:
    from maelab.data.scenes import ScenesConfig

    section = _model(IngestSection, ingest, where, "ingest")
    for i, cfg in enumerate(section.sources):
        prefix = f"ingest.sources[{i}]"
        kind = cfg.get("type")
        if kind not in _SOURCE_KEYS:
            _fail(where, f"{prefix}.type", f"{kind!r} is unknown; choose one of {sorted(_SOURCE_KEYS)}")
        if "root" not in cfg:
            _fail(where, f"{prefix}.root", "missing")
        allowed = _SOURCE_COMMON | _SOURCE_KEYS[kind]
        if kind == "scenes":
            allowed |= set(ScenesConfig.__dataclass_fields__)
        for key in cfg:
            if key not in allowed:
                _unknown(where, f"{prefix}.{key}", sorted(allowed))


def check_parameters(params: Mapping[str, Any]) -> None:
    """The whole parameter tree (what ``kedro run`` sees, ``--params`` included)."""
    from maelab.recipes import resolve_recipe

    for key in params:
        if key not in TOP_LEVEL:
            _unknown("parameters", str(key), list(TOP_LEVEL))
    recipes = params.get("recipes") or {}
    if "pretrain" in params:
        chosen = _model(PretrainSection, params["pretrain"], "parameters", "pretrain").recipe
        if recipes and chosen not in recipes:
            _fail("parameters", "pretrain.recipe", f"{chosen!r} is not in recipes ({sorted(recipes)})")
    for name in recipes:
        check_recipe(
            resolve_recipe(dict(params), name), f"recipe {name!r} (recipe_defaults + recipes.{name})"
        )
    if "ingest" in params:
        check_ingest(params["ingest"])

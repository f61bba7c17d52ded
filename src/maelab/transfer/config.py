"""Typed transfer task configs: each task's defaults live here, once; parameters override them.

``task_config("finetune", params)`` merges ``transfer.data`` / ``transfer.device`` under
``transfer.tasks.finetune`` and builds a :class:`FineTuneConfig`. A key the task does not know (a typo such as
``layer_decayy``) raises :class:`ConfigError` naming the key and the task, before anything runs.

Defaults are the papers' recipes (MAE §A.2/§A.3, ViTDet §4.1/App. A.2, BEiT/MAE UperNet); the embedded
default's CPU-sized values are in ``conf/base/parameters_transfer.yml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from maelab.config import deep_merge


class ConfigError(ValueError):
    """A transfer parameter that is unknown or has the wrong shape."""


def _build(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """``cls(**values)`` with nested dataclass fields built too; unknown keys fail naming ``where``."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(sorted(fields))})"
        )
    for name, value in values.items():
        nested = getattr(cls, "NESTED", {}).get(name)
        if nested is not None:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping, got {type(value).__name__}")
            values[name] = _build(nested, value, f"{where}.{name}")
        elif isinstance(value, list):
            values[name] = tuple(value)
    return cls(**values)


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataConfig:
    """Which manifest rows a task reads (``transfer.data``, merged under every task's ``data``)."""

    sources: tuple[str, ...] = ("scenes",)
    train_split: str = "train"
    eval_split: str = "val"
    max_train_images: int | None = None  # a CPU budget: the first N rows of the split (None = all)
    max_eval_images: int | None = None


@dataclass(frozen=True)
class DetectionData(DataConfig):
    source: str = "scenes"  # the COCO-format source: coco_annotations["instances_<source>_<split>"]
    evaluator: str = "coco"  # coco | lvis

    def __post_init__(self) -> None:
        if self.evaluator not in ("coco", "lvis"):
            raise ConfigError(
                f"transfer.tasks.detection.data.evaluator: expected coco | lvis, got {self.evaluator!r}"
            )


@dataclass(frozen=True)
class SegmentationData(DataConfig):
    num_classes: int | None = None  # None: categories of instances_<source>_<train_split> + 1 (background)
    reduce_zero_label: bool = False


# -------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskConfig:
    """What every task has: switch, device, seed, input size, batching, the data selection."""

    TASK: ClassVar[str] = ""
    NESTED: ClassVar[dict[str, type]] = {"data": DataConfig}

    enabled: bool = True
    device: str | None = "auto"
    seed: int = 0
    img_size: int | None = None  # None: the encoder's pre-training size
    patch_size: int | None = None  # None: the encoder's; another is resized (long-seq MAE §4.1)
    batch_size: int = 64
    eval_batch_size: int = 64
    num_workers: int = 0
    data: DataConfig = field(default_factory=DataConfig)


@dataclass(frozen=True)
class FineTuneLoopConfig(TaskConfig):
    """The shared fine-tune loop (:func:`maelab.transfer.loop.fine_tune`): AdamW with layer-wise lr decay,
    warm-up then the task's decay, gradient accumulation. ``steps``/``warmup_steps`` win over epochs
    (``maelab.train.schedule.resolve_steps``)."""

    SCHEDULE: ClassVar[str] = "cosine"  # cosine | poly | step, see maelab.transfer.loop.lr_schedule

    steps: int | None = None
    epochs: int | None = 100
    warmup_steps: int | None = None
    warmup_epochs: int | None = 5
    lr: float | None = None  # absolute lr; else blr x effective batch / 256
    blr: float | None = None
    min_lr: float = 0.0
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    drop_path: float = 0.1
    clip_grad: float | None = None
    accum_steps: int = 1

    def __post_init__(self) -> None:
        if self.lr is None and self.blr is None:
            raise ConfigError(f"transfer.tasks.{self.TASK}: set lr or blr")
        if self.accum_steps < 1:
            raise ConfigError(
                f"transfer.tasks.{self.TASK}.accum_steps: expected >= 1, got {self.accum_steps}"
            )


def _check_choice(task: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"transfer.tasks.{task}.{name}: expected {' | '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class FrozenProbeConfig(TaskConfig):
    """A probe on frozen features (:mod:`maelab.transfer.probes`), run once per seed in ``seeds``: every
    float metric is reported as the mean over seeds, with ``<metric>_std``. A seed also draws the
    random-init encoder's weights."""

    seeds: tuple[int, ...] = (0,)
    extract_batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError(f"transfer.tasks.{self.TASK}.seeds: expected at least one seed")


@dataclass(frozen=True)
class LinearProbeConfig(FrozenProbeConfig):
    """MAE §A.3 / Tab. 10: frozen encoder, BN(affine=False) + linear, LARS, no weight decay."""

    TASK: ClassVar[str] = "linear_probe"

    pool: str = "cls"  # cls | mean
    optimizer: str = "lars"  # lars | sgd
    lr: float | None = None
    blr: float = 0.1
    batch_size: int = 256
    epochs: int = 90
    warmup_epochs: int = 10
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(self.TASK, "pool", self.pool, ("cls", "mean"))
        _check_choice(self.TASK, "optimizer", self.optimizer, ("lars", "sgd"))


@dataclass(frozen=True)
class KnnProbeConfig(FrozenProbeConfig):
    """DINO's weighted kNN (Caron et al. 2021, §4.1 / ``eval_knn``): k 20, temperature 0.07, on the CLS
    feature, no standardisation."""

    TASK: ClassVar[str] = "knn_probe"

    pool: str = "cls"  # cls | mean
    k: int = 20
    temperature: float = 0.07
    standardize: bool = False  # z-score with train statistics before the cosine (not in DINO)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(self.TASK, "pool", self.pool, ("cls", "mean"))
        if self.k < 1 or self.temperature <= 0:
            raise ConfigError(
                f"transfer.tasks.knn_probe: need k >= 1 and temperature > 0, got {self.k}, {self.temperature}"
            )


@dataclass(frozen=True)
class FineTuneConfig(FineTuneLoopConfig):
    """MAE §A.2 / Tab. 9: global pool, mixup/cutmix, label smoothing, RandAugment, random erasing."""

    TASK: ClassVar[str] = "finetune"

    blr: float | None = 5e-4
    min_lr: float = 1e-6
    global_pool: bool = True
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    rand_augment: str | None = None  # a timm RandAugment config, e.g. rand-m9-mstd0.5-inc1
    erase_prob: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)


@dataclass(frozen=True)
class DetectionConfig(FineTuneLoopConfig):
    """ViTDet Mask R-CNN (Li et al. 2022, §4.1, App. A.2)."""

    TASK: ClassVar[str] = "detection"
    SCHEDULE: ClassVar[str] = "step"
    NESTED: ClassVar[dict[str, type]] = {"data": DetectionData}

    data: DetectionData = field(default_factory=DetectionData)
    img_size: int | None = 1024
    window_size: int = 14
    global_blocks: tuple[int, ...] | None = None  # None: 4 evenly spaced blocks (ViT-B: 2, 5, 8, 11)
    use_rel_pos: bool = False
    grad_checkpoint: bool = False
    out_channels: int = 256
    head_channels: int | None = None  # None: out_channels
    fc_dim: int = 1024
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    detections_per_img: int = 100
    score_thresh: float = 0.05
    warmup_steps: int | None = 250
    lr: float | None = 1e-4
    layer_decay: float = 0.7
    weight_decay: float = 0.1
    lsj: tuple[float, float] = (0.1, 2.0)  # large-scale jitter
    lr_milestones: tuple[float, ...] = (0.9, 0.95)  # x0.1 at these fractions of training
    eval_batch_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.img_size is None or self.img_size % 32:
            raise ConfigError(
                f"transfer.tasks.detection.img_size: {self.img_size} must be a multiple of 32 "
                "(Mask R-CNN batching)"
            )


@dataclass(frozen=True)
class SegmentationConfig(FineTuneLoopConfig):
    """UperNet on 4 encoder blocks (BEiT §3.3 / MAE §A.4, mmsegmentation's config)."""

    TASK: ClassVar[str] = "segmentation"
    SCHEDULE: ClassVar[str] = "poly"
    NESTED: ClassVar[dict[str, type]] = {"data": SegmentationData}

    data: SegmentationData = field(default_factory=SegmentationData)
    img_size: int | None = 512
    out_indices: tuple[int, ...] | None = None  # None: 4 evenly spaced blocks (ViT-B: 3, 5, 7, 11)
    decoder_channels: int = 512
    aux_channels: int = 256  # the auxiliary FCN head (training only); 0 = none
    aux_weight: float = 0.4
    batch_size: int = 16
    steps: int | None = 160_000
    warmup_steps: int | None = 1500
    lr: float | None = 1e-4
    layer_decay: float = 0.65
    crop_scale: tuple[float, float] = (0.5, 1.0)
    seeds: tuple[int, ...] = (0,)  # mIoU is the mean over these runs (long-seq MAE §4.1: 3)
    eval_batch_size: int = 8


@dataclass(frozen=True)
class SegProbeConfig(FrozenProbeConfig):
    """DINOv2's linear segmentation probe (Oquab et al. 2023, §7.4 "linear"): BatchNorm + 1x1 conv on the
    frozen final patch tokens, logits upsampled bilinearly; AdamW, warm-up then cosine."""

    TASK: ClassVar[str] = "seg_probe"
    NESTED: ClassVar[dict[str, type]] = {"data": SegmentationData}

    data: SegmentationData = field(default_factory=SegmentationData)
    epochs: int = 10
    warmup_epochs: int = 1
    lr: float = 1e-2
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class FgProbeConfig(SegProbeConfig):
    """The same linear probe, class-agnostic: every instance pixel is foreground (1), the rest background (0).
    It asks whether the patch tokens separate objects from background (the region awareness R-MAE claims,
    §1), which the class-wise probe does not credit when the object's class is not recognised. Not in
    DINOv2; ``data.num_classes`` must be 2 or unset (it is set to 2), and label 0 must stay (the
    background)."""

    TASK: ClassVar[str] = "fg_probe"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data.num_classes not in (None, 2):
            raise ConfigError(
                f"transfer.tasks.{self.TASK}.data.num_classes: foreground / background is 2 classes, "
                f"got {self.data.num_classes}"
            )
        if self.data.reduce_zero_label:
            raise ConfigError(f"transfer.tasks.{self.TASK}.data.reduce_zero_label: label 0 is the background")
        # a known class count: the probe resolves it like any other, and no node reads the annotations for it
        object.__setattr__(self, "data", dataclasses.replace(self.data, num_classes=2))


@dataclass(frozen=True)
class SupervisedReferenceConfig(TaskConfig):
    """The supervised reference (:mod:`maelab.transfer.supervised`): a small CNN trained from scratch with
    the labels, the ceiling of the task at its budget. It takes no encoder: it is the only task of the
    encoder name ``supervised_reference`` (:data:`SUPERVISED_ENCODER`), reported as that row's fine-tune."""

    TASK: ClassVar[str] = "supervised_reference"

    widths: tuple[int, ...] = (16, 32, 64, 64)  # channels per stage; 2x2 max-pooling between stages
    steps: int = 2000
    warmup_steps: int = 100
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | sgd (Nesterov, momentum 0.9)
    lr: float = 1e-3
    weight_decay: float = 0.05
    crop_scale: tuple[float, float] = (0.5, 1.0)
    seeds: tuple[int, ...] = (0,)
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        _check_choice(self.TASK, "optimizer", self.optimizer, ("adamw", "sgd"))
        if not self.widths or not self.seeds:
            raise ConfigError(f"transfer.tasks.{self.TASK}: widths and seeds must not be empty")


SUPERVISED_ENCODER = "supervised_reference"  # the encoder name whose only task is SupervisedReferenceConfig
TASK_CONFIGS: dict[str, type[TaskConfig]] = {
    c.TASK: c
    for c in (
        LinearProbeConfig,
        KnnProbeConfig,
        SegProbeConfig,
        FgProbeConfig,
        FineTuneConfig,
        DetectionConfig,
        SegmentationConfig,
        SupervisedReferenceConfig,
    )
}
TASKS = tuple(TASK_CONFIGS)
# the tasks every encoder runs (the supervised reference has no encoder to transfer)
ENCODER_TASKS = tuple(t for t in TASKS if t != SupervisedReferenceConfig.TASK)


def task_config(task: str, transfer: dict[str, Any]) -> TaskConfig:
    """``transfer.tasks.<task>`` with ``transfer.data`` and ``transfer.device`` underneath, typed."""
    if task not in TASK_CONFIGS:
        raise ConfigError(f"transfer.tasks: unknown task {task!r} (known: {', '.join(TASKS)})")
    tasks = transfer.get("tasks") or {}
    unknown = sorted(set(tasks) - set(TASK_CONFIGS))
    if unknown:
        raise ConfigError(f"transfer.tasks: unknown task(s) {unknown} (known: {', '.join(TASKS)})")
    shared = {"data": transfer.get("data") or {}, "device": transfer.get("device", "auto")}
    return _build(TASK_CONFIGS[task], deep_merge(shared, tasks.get(task) or {}), f"transfer.tasks.{task}")

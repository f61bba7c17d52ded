"""Pre-training data: manifest rows -> random views + mask plans, in a resumable order.

Reproducibility: every random draw of a sample (crop, flip, mask, extras) comes from one
``torch.Generator`` seeded from ``(seed, epoch, index)``, inside the worker. A run therefore
sees the same samples whatever ``num_workers`` is, and resuming needs only the data position
``(epoch, batch in epoch)``: the sampler re-creates the epoch's permutation and skips the
consumed batches without decoding them. The sampler also says which batch of the run a sample
belongs to, so the masker gets the optimiser step it masks for (``MaskContext``).

Sample extras (plug-ins, chosen by the recipe's ``data`` block through ``SAMPLE_EXTRAS``):
``extra(sample, row, view, generator) -> None`` adds keys to the sample dict, after the image
and plan are made. It must apply ``view`` to anything aligned with the image
(``view.apply_labels`` for label maps) and read ``sample["plan"]`` when it depends on the mask
(e.g. R-MAE region maps share the pixel branch's plan, §3.2). Extra tensors are stacked by
:func:`collate`; an extra may also return plain python values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from maelab.data.decode import decode_crop, decode_rgb, load_rgb, read_bounded
from maelab.data.manifest import image_path, select_rows
from maelab.data.view import IMAGENET_MEAN, IMAGENET_STD, View
from maelab.masking.context import MaskContext
from maelab.masking.plan import MaskPlan

SampleExtra = Callable[[dict[str, Any], pd.Series, View, torch.Generator], None]


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & (2**63 - 1)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of every random draw for sample ``index`` in ``epoch``."""
    return mix_seed(seed, epoch, index)


def manifest_rows(manifest: pd.DataFrame, data_cfg: dict[str, Any], where: str = "manifest") -> pd.DataFrame:
    """Manifest rows whose ``source``/``split`` are in ``data.sources``/``data.splits`` (unset: any)."""
    for col in ("source", "split", "root", "path"):
        if col not in manifest.columns:
            raise ValueError(f"{where}: missing column {col!r} (see maelab.data.manifest)")
    sources, splits = data_cfg.get("sources") or None, data_cfg.get("splits") or None
    return select_rows(manifest, sources, splits, where=where, fields=("data.sources", "data.splits"))


ExtraFactory = Callable[[dict[str, Any], dict[str, Any]], SampleExtra | None]

# The recipe's ``data`` block picks sample extras by key: ``data.<key>: {params}`` ->
# ``factory(params, recipe)`` (the whole recipe, for what the extra must agree with: a head's mask ratio).
# Extras run in this order (after the image and the plan). MR-MAE's teacher features register "teacher".
SAMPLE_EXTRAS: dict[str, ExtraFactory] = {}


def register_extra(key: str) -> Callable[[ExtraFactory], ExtraFactory]:
    """Decorator: ``@register_extra("teacher")`` on ``factory(params, recipe) -> SampleExtra``."""

    def add(factory: ExtraFactory) -> ExtraFactory:
        if key in SAMPLE_EXTRAS:
            raise ValueError(f"sample extra {key!r} is registered twice")
        SAMPLE_EXTRAS[key] = factory
        return factory

    return add


@register_extra("regions")
def region_extra(params: dict[str, Any], recipe: dict[str, Any]) -> SampleExtra:
    """R-MAE's region maps: ``data.regions: {source, k, store, ...}`` ->
    :class:`~maelab.regions.sampling.RegionExtra` reading the region store folder ``store`` (the Kedro
    pretrain node sets it from the ``region_store`` dataset; ``python -m maelab.train`` from the catalog).
    The recipe's heads give it the region head's mask ratio, so eligibility uses the region plan."""
    from maelab.regions.sampling import RegionExtra

    if not params.get("store"):
        raise ValueError(
            "recipe data.regions: field 'store' (the region store folder) is not set; run through the "
            "Kedro pretrain pipeline, which reads it from the region_store dataset"
        )
    return RegionExtra.from_params(params, heads=recipe.get("heads"))


@register_extra("teacher")
def teacher_extra(params: dict[str, Any], recipe: dict[str, Any]) -> SampleExtra | None:
    """MR-MAE's teacher features: ``data.teacher: {mode: store, source, store}`` ->
    :class:`~maelab.teachers.store.TeacherExtra`, the stored dense map of the image resampled with the view's
    crop and flip to the student's patch grid, as ``sample["teacher/<head>"]``; the mimic head then reads it
    instead of running the teacher. ``mode: online`` (the default) adds nothing: the teacher runs in the
    step."""
    if params.get("mode", "online") == "online":
        return None
    from maelab.teachers.store import extra_from_params

    return extra_from_params(params, recipe)


def recipe_extras(recipe: dict[str, Any]) -> list[SampleExtra]:
    """The sample extras the recipe's ``data`` block asks for, one per registered key that is set (a
    factory may return None: nothing to add for these settings)."""
    data_cfg = recipe.get("data", {})
    made = [factory(data_cfg[key], recipe) for key, factory in SAMPLE_EXTRAS.items() if data_cfg.get(key)]
    return [extra for extra in made if extra is not None]


class PretrainDataset(Dataset):
    """Map-style dataset indexed by ``(epoch, index[, batch])`` (what :class:`EpochBatchSampler` yields;
    ``batch``: the run's micro-batch number, so the masker's context has ``step = batch // accum_steps``).

    A sample: ``image [3, H, W]`` float (ImageNet-normalised), ``plan`` (``MaskPlan [L]``, absent
    when the masker runs in the step), ``index``, ``image_id``, plus what the extras add.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        recipe: dict[str, Any],
        seed: int = 0,
        masker: Any | None = None,
        extras: Sequence[SampleExtra] = (),
    ) -> None:
        data_cfg = recipe.get("data", {})
        enc = recipe["encoder"]
        self.rows = manifest_rows(manifest, data_cfg)
        size = enc["img_size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.crop_scale = tuple(data_cfg.get("crop_scale", (0.2, 1.0)))
        self.seed = int(seed)
        self.masker = masker
        self.extras = list(extras) + recipe_extras(recipe)
        self.accum_steps, self.total_steps = 1, 0  # the engine sets them once the run's length is known
        # data.decode: full (decode whole, torch bicubic) | crop (decode only what the crop needs, Pillow);
        # data.shards: read the encoded bytes from ingest's packed shards instead of one file per image
        self.decode = str(data_cfg.get("decode") or "full")
        self.shards = data_cfg.get("shards")
        self._reader: Any = None
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, row: pd.Series) -> Tensor:
        """RGB ``[3, H, W]`` float in [0, 1], decoded exactly as ingest accepted it (EXIF-upright), so
        region maps computed from the same decode stay aligned."""
        path = image_path(row)
        try:
            arr = np.asarray(load_rgb(path))
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{path}: cannot decode image (manifest row {row['image_id']!r}): {exc}"
            ) from exc
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)

    def image_bytes(self, row: pd.Series) -> bytes:
        """The encoded image: from the shard folder (``data.shards``) or its own file."""
        if self.shards:
            if self._reader is None:
                from maelab.data.shards import ShardReader

                self._reader = ShardReader(self.shards)
            return self._reader.read(str(row["image_id"]))
        return read_bounded(image_path(row), 1 << 40)

    def load_view(self, row: pd.Series, generator: torch.Generator) -> tuple[View, Tensor]:
        """The sample's random view and its pixels ``[3, H, W]`` in [0, 1]. ``data.decode: crop`` draws the
        same view from the manifest's (upright) size, then decodes only what it needs
        (``maelab.data.decode.decode_crop``)."""
        if self.decode == "crop" or self.shards:
            src_hw = (int(row["height"]), int(row["width"]))
            view = View.random_resized_crop(src_hw, self.size, self.crop_scale, generator=generator)
            try:
                data = self.image_bytes(row)
                if self.decode == "crop":
                    box = (view.top, view.left, view.height, view.width)
                    arr = np.asarray(decode_crop(data, box, view.size, view.flip))
                    return view, torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
                img = np.asarray(decode_rgb(data))
            except (OSError, ValueError, KeyError) as exc:
                raise ValueError(
                    f"{image_path(row)}: cannot decode image ({row['image_id']!r}): {exc}"
                ) from exc
            full = torch.from_numpy(img.copy()).permute(2, 0, 1).float().div_(255.0)
            return view, view.apply(full, mode="bicubic").clamp_(0.0, 1.0)
        img = self.load_image(row)  # [3, h, w]
        # MAE §A.1: RandomResizedCrop(scale=(0.2, 1), bicubic) + horizontal flip
        view = View.random_resized_crop(
            tuple(img.shape[-2:]), self.size, self.crop_scale, generator=generator
        )
        return view, view.apply(img, mode="bicubic").clamp_(0.0, 1.0)

    def context(self, epoch: int, batch: int) -> MaskContext:
        return MaskContext(step=batch // self.accum_steps, epoch=epoch, total_steps=self.total_steps)

    def __getitem__(self, key: tuple[int, ...]) -> dict[str, Any]:
        epoch, index, batch = key if len(key) == 3 else (*key, 0)
        row = self.rows.iloc[index]
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        view, img = self.load_view(row, g)
        sample: dict[str, Any] = {
            "image": (img - self.mean) / self.std,
            "index": index,
            "image_id": str(row["image_id"]),
        }
        if self.masker is not None and not getattr(self.masker, "in_step", False):
            sample["plan"] = self.masker(g, self.context(epoch, batch))
        for extra in self.extras:
            extra(sample, row, view, g)
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, collate plans with ``MaskPlan.collate``, keep other values as lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], MaskPlan):
            out[key] = MaskPlan.collate(values)
        elif isinstance(values[0], Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int | float) and not isinstance(values[0], bool):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


class EpochBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Endless batches of ``(epoch, index, batch)`` (``batch``: the micro-batch's number in the run on
    this rank, ``epoch * batches_per_epoch + batch in epoch``): per epoch a permutation seeded by
    ``(seed, epoch)``,
    sharded like ``DistributedSampler`` (pad by wrapping to a multiple of ``world``, take every
    ``world``-th from ``rank``), cut into full batches (the tail is dropped).

    ``start = (epoch, batch)`` resumes exactly after the consumed batches.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start: tuple[int, int] = (0, 0),
    ) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.start = start
        per_rank = -(-n // world)
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"data: {n} images over {world} process(es) give {per_rank} per process, "
                f"fewer than train.batch_size={batch_size}"
            )

    def epoch_indices(self, epoch: int) -> list[int]:
        # [seed, epoch] hashes apart from every sample seed [seed, epoch, index]
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        total = -(-self.n // self.world) * self.world
        perm = (perm * (total // self.n + 1))[:total]
        return perm[self.rank : total : self.world]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, skip = self.start
        while True:
            idx = self.epoch_indices(epoch)
            for b in range(skip, self.batches_per_epoch):
                number = epoch * self.batches_per_epoch + b
                yield [(epoch, i, number) for i in idx[b * self.batch_size : (b + 1) * self.batch_size]]
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return 2**62


def build_loader(
    dataset: PretrainDataset,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    start: tuple[int, int] = (0, 0),
    num_workers: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, EpochBatchSampler]:
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, rank, world, start)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    return loader, sampler


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (run `kedro run --pipelines=ingest` first)")
    return pd.read_parquet(path)

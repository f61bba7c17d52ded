"""``maelab serve``: interactive segmentation with a registered R-MAE, in the browser (R-MAE §4.2, Fig. 6).

One FastAPI app and one plain HTML/JS page (``static/index.html``). The page picks a registered R-MAE (a
``NAME@ALIAS`` whose full state has a region head) and an image (an upload, or a held-out image of the
manifest); clicks and brush strokes are prompts (shift: background). Points arrive in the image's own
pixels and are mapped onto the model's patch grid whatever the image size (:func:`patch_at`). The answer is
the region branch's probability map, shown next to the trivial baseline, the union of the prompt patches;
the threshold is applied in the page, and the mask comes back as a PNG at the image's size.

Uploads are held in memory (never written), refused over a size or pixel limit, and refused when they are
not an image or are damaged, with a message that says which. Registry downloads go into a temporary folder.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, Field

from maelab.analysis.interactive import image_tensor, patch_at, region_head, segment_interactive

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
MAX_UPLOAD_MB = 8
MAX_PIXELS = 25_000_000  # decoded size limit (a small file can decode to a huge image)
KEEP_UPLOADS = 32  # uploads held in memory; the oldest goes first
KEEP_MODELS = 4


class Point(BaseModel):
    x: float  # pixels of the image as stored (its own width and height)
    y: float
    background: bool = False


class SegmentRequest(BaseModel):
    model: str = Field(min_length=1, description="NAME@ALIAS or NAME/VERSION (a models:/ prefix is fine)")
    image: str = Field(min_length=1)
    points: list[Point] = Field(min_length=1, max_length=4096)
    image_visible: Literal["all", "prompt"] = "all"


class MaskRequest(SegmentRequest):
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    which: Literal["model", "baseline"] = "model"


class BadImage(ValueError):
    """An upload that is not an image, is damaged, or is too large: ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------- images
def decode_upload(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes of an uploaded file -> ``[H, W, 3]`` uint8 (EXIF orientation applied), or :class:`BadImage`."""
    if not data:
        raise BadImage(400, "the upload is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in FORMATS:
                raise BadImage(415, f"{im.format} images are not accepted (use {', '.join(FORMATS)})")
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage(413, f"the image is {w}x{h} pixels; the limit is {max_pixels:,} pixels")
            im.load()
            rgb = np.array(ImageOps.exif_transpose(im).convert("RGB"))
    except UnidentifiedImageError:
        raise BadImage(415, f"not an image (accepted: {', '.join(FORMATS)})") from None
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(400, f"the image is damaged or truncated ({err})") from None
    if min(rgb.shape[:2]) < 1:
        raise BadImage(400, "the image has no pixels")
    return rgb


def human_size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 // 10 else f"{n / 1024:.1f} KB"


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class Images:
    """Images by id: the manifest's held-out images (``m:<image_id>``, read on demand) and uploads
    (``u:<n>``, held in memory, the oldest dropped beyond ``keep``)."""

    def __init__(self, manifest: pd.DataFrame | None, root: Path, keep: int = KEEP_UPLOADS) -> None:
        self.root, self.keep = root, keep
        self.held_out: dict[str, dict[str, Any]] = {}
        if manifest is not None and len(manifest):
            rows = manifest[manifest["split"].astype(str) != "train"].sort_values("image_id")
            for row in rows.to_dict("records"):
                self.held_out[f"m:{row['image_id']}"] = row
        self.uploads: OrderedDict[str, tuple[np.ndarray, str]] = OrderedDict()
        self.count = 0
        self.lock = threading.Lock()

    def listing(self) -> list[dict[str, Any]]:
        return [
            {"id": key, "name": f"{row['image_id']} ({row['path']})", "width": row.get("width")}
            for key, row in self.held_out.items()
        ]

    def add(self, rgb: np.ndarray, name: str) -> str:
        with self.lock:
            self.count += 1
            key = f"u:{self.count}"
            self.uploads[key] = (rgb, name)
            while len(self.uploads) > self.keep:
                self.uploads.popitem(last=False)
        return key

    def get(self, key: str) -> np.ndarray:
        with self.lock:
            if key in self.uploads:
                return self.uploads[key][0]
        row = self.held_out.get(key)
        if row is None:
            raise HTTPException(404, f"no image {key!r} (uploads are kept for the last {self.keep} only)")
        root = Path(row["root"])
        path = (root if root.is_absolute() else self.root / root) / row["path"]
        try:
            with Image.open(path) as im:
                return np.array(ImageOps.exif_transpose(im).convert("RGB"))
        except OSError as err:
            raise HTTPException(500, f"{path}: cannot read the manifest image ({err})") from None


# ------------------------------------------------------------------------------------------- models
def region_models(env: str | None, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Every alias of a registered model whose full state has a region head: ``{ref, version, step}``."""
    from maelab.orchestration.registry import client, get_version

    if only:
        out = []
        for ref in only:
            mv = get_version(ref.removeprefix("models:/"), env)
            out.append({"ref": ref.removeprefix("models:/"), "version": int(mv.version), "step": None})
        return out
    c = client(env)
    out = []
    for rm in c.search_registered_models(max_results=1000):
        for alias, version in sorted((rm.aliases or {}).items()):
            tags = c.get_model_version(rm.name, version).tags or {}
            if "region" in tags.get("state_heads", "").split(","):
                step = int(tags["state_step"]) if tags.get("state_step") else None
                out.append({"ref": f"{rm.name}@{alias}", "version": int(version), "step": step})
    return sorted(
        out, key=lambda m: (m["ref"].split("@")[0], m["ref"] != m["ref"].split("@")[0] + "@champion")
    )


class Models:
    """Pre-trained models by registry version, loaded from their full states on first use."""

    def __init__(self, env: str | None, cache_dir: Path, keep: int = KEEP_MODELS) -> None:
        self.env, self.cache_dir, self.keep = env, cache_dir, keep
        self.loaded: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, ref: str) -> tuple[Any, str]:
        from maelab.analysis.interactive import model_from_registry
        from maelab.orchestration.registry import get_version

        ref = ref.removeprefix("models:/")
        try:
            mv = get_version(ref, self.env)
        except (LookupError, ValueError) as err:
            raise HTTPException(404, str(err)) from None
        key = (mv.name, str(mv.version))
        with self.lock:
            if key not in self.loaded:
                try:
                    model = model_from_registry(f"models:/{mv.name}/{mv.version}", self.env, self.cache_dir)
                    region_head(model)
                except (LookupError, ValueError, FileNotFoundError) as err:
                    raise HTTPException(422, f"{ref}: cannot segment with it: {err}") from None
                self.loaded[key] = model
                while len(self.loaded) > self.keep:
                    self.loaded.popitem(last=False)
            self.loaded.move_to_end(key)
            return self.loaded[key], f"{mv.name} v{mv.version}"


# ------------------------------------------------------------------------------------------ segment
def prompts(points: list[Point], size: tuple[int, int], grid: tuple[int, int]) -> tuple[list[int], list[int]]:
    """Foreground and background patch ids of the points (the later point wins a patch both mark)."""
    label: dict[int, bool] = {}
    for p in points:
        try:
            label[patch_at(p.x, p.y, size, grid)] = p.background
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
    fg = sorted(i for i, bg in label.items() if not bg)
    bg = sorted(i for i, b in label.items() if b)
    if not fg:
        raise HTTPException(400, "click at least one point on the object (shift-click marks background)")
    return fg, bg


def patches_mask(ids: list[int], size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` bool: the pixels of an image of ``size`` that fall in patches ``ids`` (as :func:`patch_at`
    maps them)."""
    (h, w), (gh, gw) = size, grid
    rows = (2 * np.arange(h) + 1) * gh // (2 * h)
    cols = (2 * np.arange(w) + 1) * gw // (2 * w)
    chosen = np.zeros(gh * gw, dtype=bool)
    chosen[ids] = True
    return chosen[rows[:, None] * gw + cols[None, :]]


def run_segment(model: Any, rgb: np.ndarray, req: SegmentRequest) -> dict[str, Any]:
    """Predicted probabilities ``[h, w]`` at the model's input size, the prompt patches and the baseline."""
    rh = region_head(model)
    grid, size = tuple(rh.spec.grid), tuple(model.encoder.img_size)
    fg, bg = prompts(req.points, rgb.shape[:2], grid)
    if len(fg) + len(bg) >= grid[0] * grid[1]:
        raise HTTPException(400, "every patch is a prompt: leave some of the image to predict")
    prob = segment_interactive(
        model, image_tensor(rgb, size), fg, bg, image_visible=req.image_visible
    )  # [h, w] at the model's input size
    return {"prob": prob, "grid": grid, "foreground": fg, "background": bg}


def full_size(prob: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Probabilities at the model's size -> the image's ``size`` (bilinear)."""
    return F.interpolate(prob[None, None].float(), size=size, mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()


# ---------------------------------------------------------------------------------------------- app
def create_app(
    *,
    env: str | None = None,
    manifest: pd.DataFrame | None = None,
    workdir: str | Path,
    project_root: Path | None = None,
    models: list[str] | None = None,
    max_upload_bytes: int = MAX_UPLOAD_MB * 2**20,
    max_pixels: int = MAX_PIXELS,
) -> FastAPI:
    """The app. workdir: the temporary folder registry downloads go to (nothing else is written)."""
    from maelab.paths import project_root as default_root

    app = FastAPI(title="maelab serve", docs_url=None, redoc_url=None, openapi_url=None)
    images = Images(manifest, project_root or default_root())
    cache = Models(env, Path(workdir))

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1000

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/models")
    def list_models() -> dict[str, Any]:
        return {"models": region_models(env, models)}

    @app.get("/api/images")
    def list_images() -> dict[str, Any]:
        return {
            "images": images.listing(),
            "max_upload_mb": round(max_upload_bytes / 2**20, 2),
            "formats": list(FORMATS),
        }

    @app.get("/api/image")
    def image(id: str) -> Response:  # noqa: A002 (the query parameter's name)
        return Response(png_bytes(images.get(id)), media_type="image/png")

    @app.post("/api/upload")
    async def upload(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length")
        limit = human_size(max_upload_bytes)
        if declared and declared.isdigit() and int(declared) > max_upload_bytes:
            return JSONResponse(
                {"detail": f"the file is {human_size(int(declared))}; the limit is {limit}"}, 413
            )
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_upload_bytes:
                return JSONResponse({"detail": f"the file is over the {limit} limit"}, 413)
        name = unquote(request.headers.get("x-filename", "upload"))[:200]
        try:
            rgb = decode_upload(bytes(data), max_pixels)
        except BadImage as err:
            return JSONResponse({"detail": f"{name}: {err}"}, err.status)
        key = images.add(rgb, name)
        return JSONResponse({"id": key, "name": name, "width": rgb.shape[1], "height": rgb.shape[0]})

    @app.post("/api/segment")
    def segment(req: SegmentRequest) -> dict[str, Any]:
        model, label = cache.get(req.model)
        rgb = images.get(req.image)
        out, ms = timed(lambda: run_segment(model, rgb, req))
        prob = out["prob"]
        return {
            "model": label,
            "size": list(prob.shape),
            "grid": list(out["grid"]),
            "foreground": out["foreground"],
            "background": out["background"],
            "baseline": out["foreground"],  # the union of the foreground prompt patches
            "prob": [round(float(v), 3) for v in prob.flatten()],
            "ms": round(ms, 1),
        }

    @app.post("/api/mask")
    def mask(req: MaskRequest) -> Response:
        model, _ = cache.get(req.model)
        rgb = images.get(req.image)
        out = run_segment(model, rgb, req)
        size = rgb.shape[:2]
        if req.which == "baseline":
            binary = patches_mask(out["foreground"], size, out["grid"])
        else:
            binary = full_size(out["prob"], size) > req.threshold
        name = f"mask_{req.which}_t{req.threshold:.2f}.png"
        return Response(
            png_bytes((binary * 255).astype(np.uint8)),
            media_type="image/png",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    return app


def cli(args: Any) -> int:
    """``maelab serve [--env E] [--host 127.0.0.1] [--port 8000] [--model NAME@ALIAS ...] [--manifest PQ]
    [--max-upload-mb 8]``: serve the page until interrupted."""
    import tempfile

    import uvicorn

    from maelab.paths import project_root

    root = project_root()
    path = Path(args.manifest) if args.manifest else root / "data" / "02_intermediate" / "manifest.parquet"
    path = path if path.is_absolute() else root / path
    manifest = pd.read_parquet(path) if path.is_file() else None
    if manifest is None:
        log.warning("%s: no manifest; only uploads can be segmented", path)
    with tempfile.TemporaryDirectory(prefix="maelab-serve-") as workdir:
        app = create_app(
            env=args.env,
            manifest=manifest,
            workdir=workdir,
            project_root=root,
            models=args.model or None,
            max_upload_bytes=int(args.max_upload_mb * 2**20),
        )
        print(f"maelab serve: http://{args.host}:{args.port}/", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

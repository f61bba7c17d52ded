"""``maelab serve`` in a real headless browser (Debian chromium through Playwright, no download):
two clicks on an object of a held-out image, the overlay, the mask PNG, IoU against the object's ground
truth next to the prompt-union baseline; bad uploads get a message, and the server keeps serving."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, sync_playwright

from maelab.serve.app import patches_mask

CHROMIUM = "/usr/bin/chromium"  # Debian's package (.ci/run installs it)
DISPLAY = 384  # the page draws the image this wide


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def page(server: str):
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: apt-get install -y chromium (Debian's package)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(accept_downloads=True, viewport={"width": 900, "height": 640})
        page.goto(server)
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        yield page
        browser.close()


def held_out_object(root: Path) -> tuple[str, np.ndarray]:
    """The first held-out image and the ground-truth mask ``[H, W]`` of its largest object."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = json.loads((root / "data/03_primary/instances_scenes_val.json").read_text())
    coco.createIndex()
    img_id = sorted(coco.getImgIds())[0]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
    masks = [coco.annToMask(a).astype(bool) for a in anns]
    return f"m:scenes:val:{img_id}", max(masks, key=lambda m: m.sum())


def two_clicks_inside(mask: np.ndarray, grid: tuple[int, int]) -> list[tuple[float, float]]:
    """Pixel centres of the two patches of ``grid`` best covered by ``mask`` (a user clicking the object)."""
    (h, w), (gh, gw) = mask.shape, grid
    cover = mask.reshape(gh, h // gh, gw, w // gw).mean(axis=(1, 3)).flatten()
    best = np.argsort(-cover, kind="stable")[:2]
    assert cover[best].min() >= 0.5  # both clicks are on the object
    return [((i % gw + 0.5) * w / gw, (i // gw + 0.5) * h / gh) for i in best]


def segmented(page: Page, clicks: int) -> dict:
    page.wait_for_function(f"Number(document.getElementById('message').dataset.done || 0) >= {clicks}")
    script = "[document.getElementById('pred').dataset.overlay, document.getElementById('stats').textContent]"
    overlay, stats = page.evaluate(script)
    return {"overlay": overlay, "stats": stats}


def test_two_clicks_segment_an_object_and_the_mask_downloads(page: Page, rmae_project, tmp_path) -> None:
    image_id, truth = held_out_object(rmae_project.root)
    page.select_option("#model", rmae_project.model)
    page.select_option("#image", image_id)
    page.wait_for_function("document.getElementById('message').textContent.includes('click the object')")
    scale = DISPLAY / max(truth.shape)
    clicks = two_clicks_inside(truth, (8, 8))
    for n, (x, y) in enumerate(clicks, start=1):
        page.click("#pred", position={"x": x * scale, "y": y * scale})
        shown = segmented(page, n)
    assert int(shown["overlay"]) > 0  # the predicted region is painted over the image
    assert "2 foreground / 0 background patches" in shown["stats"]

    with page.expect_download() as download:
        page.click("#download")
    path = tmp_path / "mask.png"
    download.value.save_as(path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (truth.shape[1], truth.shape[0])
        mask = np.array(im) > 127

    patches = sorted(int(y * 8 / truth.shape[0]) * 8 + int(x * 8 / truth.shape[1]) for x, y in clicks)
    baseline = patches_mask(patches, truth.shape, (8, 8))
    assert (mask | ~baseline).all()  # the prompt patches are known: they are in the mask
    model_iou, baseline_iou = iou(mask, truth), iou(baseline, truth)
    print(f"\n{image_id}: IoU model {model_iou:.3f}, prompt-union baseline {baseline_iou:.3f}")
    assert 0.0 < baseline_iou < 1.0 and 0.0 < model_iou <= 1.0


def jpeg_bytes(size: int = 64) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("notes.txt", b"this is not an image\n" * 10, "not an image"),
        ("huge.png", b"\x89PNG" + bytes(600 * 1024), "limit is 0.5 MB"),
        ("cut.jpg", jpeg_bytes()[:-400], "damaged or truncated"),
    ],
)
def test_bad_uploads_get_a_clear_message_and_the_server_keeps_serving(page: Page, name, data, message):
    page.set_input_files("#upload", files=[{"name": name, "mimeType": "application/octet-stream",
                                            "buffer": data}])  # fmt: skip
    page.wait_for_selector("#message.error")
    text = page.text_content("#message")
    assert message in text and (name in text or "MB" in text)
    page.set_input_files(
        "#upload", files=[{"name": "ok.jpg", "mimeType": "image/jpeg", "buffer": jpeg_bytes()}]
    )
    page.wait_for_function("document.getElementById('message').textContent.includes('click the object')")
    before = int(page.evaluate("Number(document.getElementById('message').dataset.done || 0)"))
    page.click("#pred", position={"x": 100, "y": 100})
    shown = segmented(page, before + 1)  # the server still segments
    assert int(shown["overlay"]) >= 0 and "1 foreground" in shown["stats"]

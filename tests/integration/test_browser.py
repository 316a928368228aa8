"""The click-to-segment page in a real browser (Debian's Chromium, driven by Playwright)
against real tiers: the decoder serves the page on its HTTP port and has an encoder address,
so the first click embeds the image on a miss.

What the page overlays is read back from its mask canvas and compared with what
``Sam2Client`` gets over gRPC for the same prompt on the same embedding; errors from the
server must show as a readable message on the page.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from sam2_shared.client import Sam2Client
from sam2_shared.prompts import Prompt
from tests.helpers import REPO_ROOT
from tests.helpers.synthetic_images import synthetic_rgb
from tests.helpers.tier_processes import TierProcess, decoder_process, encoder_process

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright's own download is not used
SAMPLE = REPO_ROOT / "samples" / "scene.jpg"
MAX_IMAGE_PIXELS = 1_000_000  # the sample (1280 x 720) fits; the "too big" image does not
REQUEST_TIMEOUT_MS = 120_000

# Reads the page's mask canvas: 1 bit per pixel (alpha > 0), packed like numpy.packbits.
READ_OVERLAY_JS = """() => {
  const canvas = document.getElementById("mask-layer");
  const { width, height } = canvas;
  const rgba = canvas.getContext("2d").getImageData(0, 0, width, height).data;
  const bits = new Uint8Array(Math.ceil((width * height) / 8));
  for (let i = 0; i < width * height; i++) if (rgba[4 * i + 3] > 0) bits[i >> 3] |= 128 >> (i & 7);
  let text = "";
  for (let i = 0; i < bits.length; i += 8192) {
    text += String.fromCharCode(...bits.subarray(i, i + 8192));
  }
  return { width, height, bits: btoa(text) };
}"""


@dataclass
class Tiers:
    encoder: TierProcess
    decoder: TierProcess


@pytest.fixture(scope="module")
def tiers(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tiers]:
    store = f"diskcache://{tmp_path_factory.mktemp('store')}"
    encoder = encoder_process(tiny_checkpoint, store).start()
    try:
        decoder = decoder_process(tiny_checkpoint, store, "--encoder-address", encoder.address,
                                  "--http-port", "0", "--max-image-pixels",
                                  str(MAX_IMAGE_PIXELS)).start()
    except BaseException:
        encoder.stop()
        raise
    yield Tiers(encoder, decoder)
    decoder.stop()
    encoder.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"no {CHROMIUM}: apt-get install chromium (scripts/setup_env.sh does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 950})
    opened = context.new_page()
    opened.set_default_timeout(REQUEST_TIMEOUT_MS)
    yield opened
    context.close()


@pytest.fixture(scope="module")
def python_client(tiers: Tiers) -> Iterator[Sam2Client]:
    with Sam2Client(decoder=tiers.decoder.address, array_type="numpy") as client:
        yield client


def open_page(page: Page, tiers: Tiers, image: Path, protocol: str | None = None) -> None:
    query = f"?protocol={protocol}" if protocol else ""
    page.goto(f"{tiers.decoder.http_url}/{query}")
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector("#stage.loaded")
    # The mask and the prompt layers lie exactly over the image as displayed.
    boxes = [page.locator(f"#{layer}").bounding_box()
             for layer in ("image-layer", "mask-layer", "prompt-layer")]
    assert all(box is not None for box in boxes)
    for box in boxes[1:]:
        assert all(abs(box[k] - boxes[0][k]) < 1 for k in ("x", "y", "width", "height")), boxes


def snapshot(page: Page) -> dict[str, Any]:
    return page.evaluate("() => window.sam2Page.snapshot()")


def click_image(page: Page, x: float, y: float, *, background: bool = False,
                button: Literal["left", "right"] = "left") -> dict[str, Any]:
    """Click at image pixel (x, y) (shift-click for ``background``); wait for the answer;
    return the page's state."""
    answered = snapshot(page)["requests"]
    layer = page.locator("#prompt-layer")
    box = layer.bounding_box()
    assert box is not None
    width, height = page.evaluate("() => { const c = document.getElementById('prompt-layer');"
                                  " return [c.width, c.height]; }")
    position = {"x": x * box["width"] / width, "y": y * box["height"] / height}
    layer.click(position=position, button=button, modifiers=["Shift"] if background else [])
    page.wait_for_function(f"() => window.sam2Page.snapshot().requests > {answered}")
    return snapshot(page)


def overlay(page: Page) -> np.ndarray:
    read = page.evaluate(READ_OVERLAY_JS)
    height, width = read["height"], read["width"]
    bits = np.frombuffer(base64.b64decode(read["bits"]), dtype=np.uint8)
    return np.unpackbits(bits)[: height * width].reshape(height, width).astype(bool)


def as_prompt(step: dict[str, Any], mask_input: np.ndarray | None = None) -> Prompt:
    """The prompt the page sent in one step, for Sam2Client."""
    points = step["points"]
    return Prompt(
        point_coords=np.array([[p["x"], p["y"]] for p in points], dtype=np.float32),
        point_labels=np.array([1 if p["foreground"] else 0 for p in points]),
        mask_input=mask_input,
        multimask_output=len(points) == 1 and step["box"] is None,
    )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_clicks_overlay_the_masks_the_api_returns(page: Page, tiers: Tiers,
                                                   python_client: Sam2Client,
                                                   tmp_path: Path) -> None:
    open_page(page, tiers, SAMPLE)

    # First click: the page sends the image; the decoder embeds it through the encoder.
    first = click_image(page, 640.5, 400.5)
    assert first["error"] == ""
    [step] = first["steps"]
    assert step["sentImage"] and step["logitsHandleSent"] == ""
    assert len(step["candidates"]) == 3
    page.screenshot(path=str(tmp_path / "first-click.png"))
    assert page.locator("#candidates .candidate").count() == 3
    scores = page.locator("#candidates .score").all_inner_texts()
    assert [f"{c['score']:.3f}" in text for c, text in zip(step["candidates"], scores)] == \
        [True] * 3
    rows, _ = python_client.segment_prompts(first["embeddingId"], [as_prompt(step)])
    api = rows[0]
    assert step["chosen"] == int(api.scores[0].argmax())
    drawn = overlay(page)
    assert drawn.shape == (720, 1280)
    np.testing.assert_array_equal(drawn, api.masks[0, step["chosen"]])

    # Picking another candidate overlays that one.
    other = (step["chosen"] + 1) % 3
    page.locator(f"#candidates .candidate[data-index='{other}']").click()
    np.testing.assert_array_equal(overlay(page), api.masks[0, other])
    assert snapshot(page)["steps"][0]["chosen"] == other

    # A background click refines the chosen candidate: only the embedding id and that
    # candidate's logits handle go with it.
    second = click_image(page, 700.5, 380.5, background=True)
    assert second["error"] == ""
    refined = second["steps"][1]
    assert not refined["sentImage"]
    assert refined["logitsHandleSent"] == second["steps"][0]["candidates"][other]["logitsHandle"]
    assert [p["foreground"] for p in refined["points"]] == [True, False]
    refine_rows, _ = python_client.segment_prompts(
        second["embeddingId"], [as_prompt(refined, mask_input=api.logits[0, other])])
    expected = refine_rows[0].masks[0, 0]
    drawn = overlay(page)
    assert not np.array_equal(expected, api.masks[0, other]), "the API's mask did not change"
    # The page's input is the server's copy of the logits (by handle), the client's the inline
    # float32 logits it got back: the same values, so the same mask up to rounding.
    assert iou(drawn, expected) > 0.99
    assert page.locator("#timings li").count() == 2
    assert "(sent the image)" in page.locator("#timings li").last.inner_text()

    page.screenshot(path=str(tmp_path / "refined.png"))

    # Undo goes back to the first answer (with the candidate picked then); clear to none.
    page.click("#undo")
    np.testing.assert_array_equal(overlay(page), api.masks[0, other])
    page.click("#clear")
    assert not overlay(page).any()

    # A drag is a box prompt (one candidate), a right click a background point with it.
    layer = page.locator("#prompt-layer").bounding_box()
    assert layer is not None
    scale = layer["width"] / 1280
    page.mouse.move(layer["x"] + 560 * scale, layer["y"] + 300 * scale)
    page.mouse.down()
    page.mouse.move(layer["x"] + 760 * scale, layer["y"] + 500 * scale, steps=5)
    page.mouse.up()
    page.wait_for_function("() => window.sam2Page.snapshot().steps.length === 1")
    [boxed] = snapshot(page)["steps"]
    assert boxed["points"] == [] and len(boxed["candidates"]) == 1
    box = boxed["box"]
    assert box["xMin"] == pytest.approx(560, abs=2) and box["yMax"] == pytest.approx(500, abs=2)
    box_rows, _ = python_client.segment_prompts(second["embeddingId"], [Prompt(
        box=np.array([box["xMin"], box["yMin"], box["xMax"], box["yMax"]], dtype=np.float32),
        multimask_output=False)])
    np.testing.assert_array_equal(overlay(page), box_rows[0].masks[0, 0])
    state = click_image(page, 600.5, 320.5, button="right")
    assert [p["foreground"] for p in state["steps"][1]["points"]] == [False]
    assert state["steps"][1]["box"] == box


@pytest.mark.parametrize("protocol", ["connect-json", "grpc-web"])
def test_every_protocol_draws_the_same_mask(page: Page, tiers: Tiers,
                                            python_client: Sam2Client, protocol: str) -> None:
    open_page(page, tiers, SAMPLE, protocol)
    state = click_image(page, 320.5, 200.5)
    assert state["error"] == "", state["error"]
    [step] = state["steps"]
    rows, _ = python_client.segment_prompts(state["embeddingId"], [as_prompt(step)])
    np.testing.assert_array_equal(overlay(page), rows[0].masks[0, step["chosen"]])


def test_server_errors_show_as_readable_messages(page: Page, tiers: Tiers,
                                                 tmp_path: Path) -> None:
    # 4xx: an image over the decoder's --max-image-pixels is INVALID_ARGUMENT (HTTP 400).
    too_big = tmp_path / "too-big.png"
    cv2.imwrite(str(too_big), synthetic_rgb(1000, 1001, seed=3))
    open_page(page, tiers, too_big)
    state = click_image(page, 100.5, 100.5)
    message = page.locator("#error")
    assert message.is_visible()
    assert message.inner_text() == state["error"]
    assert state["error"].startswith("INVALID_ARGUMENT"), state["error"]
    assert f"exceeds the limit of {MAX_IMAGE_PIXELS} pixels" in state["error"]
    assert state["steps"] == [] and not overlay(page).any()
    page.screenshot(path=str(tmp_path / "error-4xx.png"))

    # 5xx: the encoder is gone, so a new image cannot be embedded (UNAVAILABLE, HTTP 503).
    tiers.encoder.stop()
    unseen = tmp_path / "unseen.png"
    cv2.imwrite(str(unseen), synthetic_rgb(240, 320, seed=4))
    open_page(page, tiers, unseen)
    state = click_image(page, 100.5, 100.5)
    assert state["error"].startswith("UNAVAILABLE"), state["error"]
    assert page.locator("#error").inner_text() == state["error"]
    page.screenshot(path=str(tmp_path / "error-5xx.png"))

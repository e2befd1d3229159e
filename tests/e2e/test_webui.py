"""The web UI end to end: real jobs on the four services, pages in headless Chromium.

- Known answer: on the planted model, unit k of layer `regions` fires on palette colour
  k's pixels at full resolution, with one gain per image (1 + the colour's share of the
  image). The region each exemplar overlay keeps as it is must be exactly the unit's raw
  map resized with PIL's bilinear filter and thresholded at its NetDissect threshold, and
  it must be colour k's region in the image: pixel IoU >= 0.9 at the report's resolution
  (the images are drawn at it, so no interpolation blurs the edges).
- A toy dissection by every method: its pages load without console errors, links
  work, unit pages show their exemplars with overlays; the static copy that the
  REPORTING stage stored reads offline (`neurodissect report`), and `neurodissect
  show` draws a unit's mask on an image that no page showed (again its colour's region).
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from neurodissect.v1 import common_pb2
from PIL import Image

from services.cli.main import available_methods, demo_layers, demo_spec
from services.cli.stack import LocalStack, available_services
from services.common import keys
from services.common.activations import read_manifest, read_units
from services.common.settings import SERVICES, Settings
from services.common.store import LocalStore
from services.gateway.client import NeurodissectClient
from services.gateway.webui.figures import IMAGE_PX, UNIT_EXEMPLARS
from services.gateway.webui.render import decode_rgb
from services.toyworld.planted import planted_units
from services.toyworld.world import WORLD
from tests.fixtures.browser import chromium, session

pytestmark = pytest.mark.timeout(1800)

REPO = Path(__file__).resolve().parents[2]
PLANTED_IMAGES, PLANTED_SIZE, PLANTED_LAYER = 200, IMAGE_PX, "regions"
TOY_IMAGES, TOY_SIZE = 200, 32
MIN_IOU = 0.9
# A thumbnail pixel shows palette colour k when it is this close to it (RGB distance):
# a thumbnail smaller than the image blends neighbouring colours on edges.
COLOUR_DISTANCE = 60.0
READY = "document.body !== null && document.body.dataset.ready === '1'"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The four services with the gateway's UI on a free port, over a fresh store."""
    root = tmp_path_factory.mktemp("webui-e2e")
    settings = Settings(store_url=f"file://{root / 'store'}",
                        cache_dir=str(REPO / "var" / "cache"), rpc_timeout_s=60.0)
    started = LocalStack(settings, services=SERVICES, ray_head=False, log_dir=root / "logs")
    started.start(timeout=900)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def jobs(stack: LocalStack) -> dict[str, common_pb2.Job]:
    """The planted colour units and a toy dissection by every method, run side by side."""
    planted = common_pb2.DissectionSpec(
        name="planted colour units",
        model=common_pb2.ModelSpec(source="toy", name="planted"),
        layers=[PLANTED_LAYER],
        dataset=common_pb2.DatasetSpec(
            kind="toyworld",
            toyworld=common_pb2.ToyWorldParams(n_images=PLANTED_IMAGES, image_size=PLANTED_SIZE),
        ),
        netdissect=common_pb2.NetDissectParams(top_quantile=0.1),
    )
    with NeurodissectClient(stack.settings) as client:
        described = client.describe_model(common_pb2.ModelSpec(source="toy", name="toynet"))
        # Every method but MILAN: the pages show whichever answers a unit has, and the toy
        # captioner's first training would dominate this module's time.
        methods = [m for m in available_methods(available_services()) if m != "milan"]
        toy = demo_spec(demo_layers(described), methods, TOY_IMAGES, TOY_SIZE)
        submitted = {"planted": client.submit(planted).id, "toy": client.submit(toy).id}
        done = {name: client.wait(job_id) for name, job_id in submitted.items()}
    for job in done.values():
        assert job.state == common_pb2.SUCCEEDED, job.error
    return done


def ui_url(stack: LocalStack) -> str:
    return f"http://{stack.settings.host}:{stack.settings.ui_port}/"


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return bytes(response.read())


def colour_region(image: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    distance = np.linalg.norm(image.astype(np.float32) - np.array(rgb, np.float32), axis=-1)
    return distance < COLOUR_DISTANCE


def unit_mask(raw: np.ndarray, threshold: float, size: int) -> np.ndarray:
    """NetDissect's mask: PIL bilinear resize of the (h, w) raw map, then > threshold."""
    resized = Image.fromarray(raw.astype(np.float32), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized) > threshold


def raw_map(store: LocalStore, job: common_pb2.Job, unit: int, image_id: int) -> np.ndarray:
    manifest = read_manifest(store, job.acts_keys[PLANTED_LAYER], PLANTED_LAYER)
    i0, i1 = next(r for r in manifest.image_ranges() if r[0] <= image_id < r[1])
    return read_units(store, manifest, unit, unit + 1, i0, i1)[image_id - i0, 0]


def overlay_iou(
    overlay: np.ndarray, image: np.ndarray, expected: np.ndarray, colour: str
) -> float:
    """Assert the overlay keeps exactly `expected`; return its IoU with the colour's region."""
    kept = (overlay == image).all(axis=-1)
    assert np.array_equal(kept, expected)
    region = colour_region(image, dict(WORLD.colors)[colour])
    return float((kept & region).sum() / max(1, (kept | region).sum()))


def test_a_colour_units_overlays_tint_its_colours_region(
    stack: LocalStack, jobs: dict[str, common_pb2.Job]
) -> None:
    job = jobs["planted"]
    store = LocalStore(stack.settings.store_url.removeprefix("file://"))
    base = f"{ui_url(stack)}jobs/{job.id}/"
    scores = []
    with NeurodissectClient(stack.settings) as client:
        thresholds = {
            u.unit: u.netdissect.threshold for u in client.units(job.id, PLANTED_LAYER)}
    for unit, colour in planted_units().items():
        page = fetch(f"{base}unit-{PLANTED_LAYER}-{unit}.html").decode()
        shown = re.findall(
            r"<figure class=exemplar data-image='(\d+)'><img class='overlay unit'[^>]*"
            r"src='(img/[0-9a-f]+\.png)'", page)
        assert len(shown) == UNIT_EXEMPLARS, unit
        for image_id, src in shown:
            overlay = decode_rgb(fetch(base + src))
            image = decode_rgb(store.get(keys.thumbnail(job.dataset_key, int(image_id), IMAGE_PX)))
            assert overlay.shape == image.shape == (IMAGE_PX, IMAGE_PX, 3)
            expected = unit_mask(raw_map(store, job, unit, int(image_id)), thresholds[unit],
                                 IMAGE_PX)
            assert expected.any(), (unit, image_id)
            scores.append((overlay_iou(overlay, image, expected, colour), colour, image_id))
    print(f"{len(scores)} overlays: IoU with their colour's region mean "
          f"{np.mean([s[0] for s in scores]):.3f}, min {min(scores)[0]:.3f}")
    assert min(scores)[0] >= MIN_IOU, min(scores)


def test_a_jobs_pages_load_without_errors_and_link_up(
    stack: LocalStack, jobs: dict[str, common_pb2.Job]
) -> None:
    job = jobs["toy"]
    with chromium() as browser, session(browser) as browsing:
        page = browsing.page()
        page.goto(ui_url(stack))
        page.locator("#jobs a", has_text=job.id).click()
        page.wait_for_load_state("load")
        assert page.locator("#state").inner_text() == "SUCCEEDED"
        plots = page.locator("img.plot")
        assert plots.count() == len(job.spec.layers)
        for i in range(plots.count()):
            assert plots.nth(i).evaluate("img => img.complete && img.naturalWidth") > 0
        assert page.locator("table.summary").count() == len(job.spec.layers)
        for layer in job.spec.layers:
            page.click(f"h2 >> text={layer}")
            page.wait_for_function(READY)
            units = job.summary[list(job.spec.layers).index(layer)].units
            assert page.locator("#count").inner_text() == f"{units} of {units} units"
            page.locator("#rows a").first.click()
            page.wait_for_load_state("load")
            assert re.search(rf"/unit-{re.escape(layer)}-0\.html$", page.url)
            figures = page.locator("figure.exemplar")
            assert figures.count() == UNIT_EXEMPLARS
            for kind in ("unit", "concept"):
                images = page.locator(f"figure.exemplar img.overlay.{kind}")
                assert images.count() == UNIT_EXEMPLARS
                assert min(images.evaluate_all(
                    "all => all.map(img => img.complete ? img.naturalWidth : 0)")) == IMAGE_PX
            assert page.locator("#answers tr").count() > 2
            page.click("header a[href='index.html']")
            page.wait_for_load_state("load")
        page.click("header >> text=search")
        first_answer = page.evaluate(
            "JSON.parse(document.getElementById('index').textContent)[0][2][0]")
        page.fill("#query", first_answer.split(": ", 1)[1])
        assert page.locator("#hits tr").count() > 0
        assert browsing.errors == []


def test_the_stored_static_copy_reads_offline(
    stack: LocalStack, jobs: dict[str, common_pb2.Job], tmp_path: Path
) -> None:
    job = jobs["toy"]
    out = tmp_path / "copy"
    run = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "--store-url", stack.settings.store_url,
         "report", job.id, "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "the job's stored copy" in run.stdout
    index = (out / "index.html").read_text()
    assert "REPORTING" not in index and "SUCCEEDED" in index
    with chromium() as browser, session(browser) as offline:
        page = offline.page()
        page.goto((out / "index.html").as_uri())
        assert page.locator("img.plot").first.evaluate("img => img.naturalWidth") > 0
        page.click(f"h2 >> text={job.spec.layers[-1]}")
        page.wait_for_function(READY)
        page.click("th[data-key=iou]")
        page.locator("#rows a").first.click()
        page.wait_for_load_state("load")
        overlays = page.locator("figure.exemplar img.overlay.unit")
        assert overlays.count() == UNIT_EXEMPLARS
        assert min(overlays.evaluate_all("all => all.map(img => img.naturalWidth)")) == IMAGE_PX
        assert offline.errors == []


def test_show_draws_a_units_mask_on_any_probe_image(
    stack: LocalStack, jobs: dict[str, common_pb2.Job], tmp_path: Path
) -> None:
    job = jobs["planted"]
    unit, colour = next(iter(planted_units().items()))
    with NeurodissectClient(stack.settings) as client:
        found = client.unit(job.id, PLANTED_LAYER, unit).netdissect
    image_id = found.exemplars[UNIT_EXEMPLARS]  # ranked, but shown on no page
    out = tmp_path / "unit.png"
    size = PLANTED_SIZE  # the image's own resolution: the mask is its colour to the pixel
    run = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "--store-url", stack.settings.store_url,
         "--extractor-addr", stack.address("extractor"), "show", job.id, "--layer", PLANTED_LAYER,
         "--unit", str(unit), "--image", str(image_id), "--size", str(size), "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    store = LocalStore(stack.settings.store_url.removeprefix("file://"))
    image = decode_rgb(store.get(keys.thumbnail(job.dataset_key, image_id, size)))
    expected = unit_mask(raw_map(store, job, unit, image_id), found.threshold, size)
    assert expected.any()
    overlap = overlay_iou(decode_rgb(out.read_bytes()), image, expected, colour)
    print(f"show at {size} px: IoU with the colour's region {overlap:.3f}")
    assert overlap >= MIN_IOU

"""Occlusion verification's model step (specs/verification.md): hide regions, measure units.

A region is one concept's whole pixel mask in one probe image: the toy world and
Broden have no instances, so connected pieces of a concept in an image are one
region. Image-level labels (scenes, textures) cover whole images and are not
occluded. Regions come from the stored label maps of an extracted dataset; up to
`max_regions` of all (image, concept) pairs are sampled with the seed.

Each sampled image runs through the model once as it is and once per region with
the region's pixels (the label mask upsampled to the input, nearest) replaced by
the fill, in raw pixel space before normalisation:

- `black`: [0, 0, 0], as the reference;
- `mean`: the dataset mean the model's preprocessing normalises with (ImageNet's
  for `imagenet`), which is 0 after normalisation;
- `blur`: the image blurred (Gaussian, radius input size / 16).

Per layer, unit u and concept c, the reference's ratio of sums over c's regions:
δ_u(c) = Σ (mean a_u(x') − mean a_u(x)) / Σ mean a_u(x), with mean the spatial mean
of the stored unit map; NaN when u is 0 on every image of c's regions (silent: no δ).
Stored per layer under a content key of the model, preprocessing, input size,
dataset and parameters (`keys.occlusion`): "labels" (C,) int32 concept numbers,
"delta" (U, C) float32, "regions" (C,) int64 and "cost" [forward passes, seconds].
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.probe_format import ConceptTable, read_concepts, read_label_chunk
from services.common.spec_vocabulary import OcclusionFill
from services.common.store import ObjectStore
from services.extractor.extraction import ComputeConfig, compute_device
from services.extractor.hooks import check_layers, layer_tap, prefix_tokens_of, unit_map
from services.extractor.models import ModelSource, fixed_input_size
from services.extractor.preprocessing import Preprocessing, check_preprocessing, preprocessing
from services.extractor.probe_dataset import ProbeDataset

# Bumped when what is stored changes, so old results are not reused.
OCCLUSION_VERSION = 1
BLUR_FRACTION = 1 / 16
PROGRESS_INTERVAL_S = 1.0


@dataclass(frozen=True)
class OcclusionConfig:
    """OcclusionParams with defaults applied."""

    fill: OcclusionFill
    max_regions: int
    seed: int


@dataclass
class OcclusionProgress:
    """Regions run so far."""

    done: int
    total: int
    message: str


@dataclass
class OcclusionOutcome:
    """What an occlusion run stored: layer -> key; `cached` when nothing was computed."""

    keys: dict[str, str]
    cached: bool


def pixel_regions(table: ConceptTable, store: ObjectStore) -> np.ndarray:
    """(R, 2) int64 (image, label) of every concept covering a pixel of an image, sorted."""
    known = np.zeros(table.max_label() + 1, dtype=bool)
    known[[c.number for c in table.labels]] = True
    found = []
    for i0, i1 in table.chunk_ranges():
        pixel = read_label_chunk(store, table.dataset_key, i0, i1).pixel  # (n, P, sh, sw)
        for k in range(len(pixel)):
            labels = np.unique(pixel[k])
            labels = labels[(labels > 0) & (labels < len(known))]
            labels = labels[known[labels]]
            found.append(np.stack([np.full(len(labels), i0 + k), labels], axis=1))
    return np.concatenate(found).astype(np.int64) if found else np.zeros((0, 2), np.int64)


def sample_regions(regions: np.ndarray, max_regions: int, seed: int) -> np.ndarray:
    """At most `max_regions` rows of (R, 2) `regions`, drawn with `seed`, in their order."""
    if len(regions) <= max_regions:
        return regions
    chosen = np.random.default_rng(seed).choice(len(regions), max_regions, replace=False)
    return regions[np.sort(chosen)]


def occluded(
    pixels: torch.Tensor, mask: torch.Tensor, fill: OcclusionFill, prep: Preprocessing,
    blurred: torch.Tensor | None = None,
) -> torch.Tensor:
    """(3, S, S) uint8 `pixels` with the (S, S) bool `mask` replaced by the fill."""
    if fill == "black":
        value = torch.zeros_like(pixels)
    elif fill == "mean":
        mean = torch.tensor(prep.mean).mul(255).round().to(torch.uint8)
        value = mean.view(3, 1, 1).expand_as(pixels)
    else:
        if blurred is None:
            raise ValueError("the blur fill needs the blurred image")
        value = blurred
    return torch.where(mask.unsqueeze(0), value, pixels)


class DeltaTally:
    """Per-concept sums of spatially averaged unit activations over occluded regions.

    `add(concepts, original, occluded)`: per region its concept column (R,), the
    original and occluded images' (R, U) unit means.
    """

    def __init__(self, n_concepts: int, n_units: int) -> None:
        self.change = np.zeros((n_concepts, n_units))
        self.original = np.zeros((n_concepts, n_units))
        self.live = np.zeros((n_concepts, n_units), dtype=bool)
        self.regions = np.zeros(n_concepts, dtype=np.int64)

    def add(self, concepts: np.ndarray, original: np.ndarray, occluded: np.ndarray) -> None:
        """Add R regions of the concepts `concepts` (R,) with (R, U) means."""
        np.add.at(self.change, concepts, occluded - original)
        np.add.at(self.original, concepts, original)
        np.logical_or.at(self.live, concepts, original != 0)
        np.add.at(self.regions, concepts, 1)

    def delta(self) -> np.ndarray:
        """(U, C) float32 Σ change / Σ original; NaN where the unit is silent on c's images."""
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = self.change / self.original
        return np.where(self.live, ratio, np.nan).T.astype(np.float32)


def occlusion_key(
    model: ModelSource, preprocessing_name: str, input_size: int, dataset_key: str,
    config: OcclusionConfig,
) -> str:
    """The content key of one occlusion run (every layer is stored under it)."""
    return keys.content_key(
        "occlusion", OCCLUSION_VERSION, model.identity, preprocessing_name, input_size,
        dataset_key, config.fill, config.max_regions, config.seed,
    )


class Occlusion:
    """One occlusion run of a model's layers over an extracted probe dataset.

    `run()` yields `OcclusionProgress` and an `OcclusionOutcome` last; the model is
    loaded only when some layer is not stored yet.
    """

    def __init__(
        self,
        store: ObjectStore,
        dataset: ProbeDataset,
        model: ModelSource,
        layers: list[str],
        compute: ComputeConfig,
        config: OcclusionConfig,
        preprocessing_name: str = "",
        input_size: int = 0,
    ) -> None:
        if not layers:
            raise InvalidArgument("at least one layer is required", field="layers")
        self.store = store
        self.dataset = dataset
        self.model_source = model
        self.layers = list(dict.fromkeys(layers))
        self.compute = compute
        self.config = config
        self.preprocessing_name = preprocessing_name or model.default_preprocessing
        check_preprocessing(self.preprocessing_name)
        self.requested_size = input_size
        self.device = compute_device(compute.device)
        self.dataset_key = dataset.key(compute.image_chunk)
        self.key = occlusion_key(
            model, self.preprocessing_name, input_size, self.dataset_key, config
        )

    def layer_keys(self) -> dict[str, str]:
        """Layer -> key of its stored changes."""
        return {layer: keys.occlusion(self.key, layer) for layer in self.layers}

    def run(self) -> Generator[OcclusionProgress | OcclusionOutcome, None, None]:
        """Occlude the sampled regions for the layers not stored yet; store each layer."""
        layer_keys = self.layer_keys()
        pending = [layer for layer, key in layer_keys.items() if not self.store.exists(key)]
        if not pending:
            yield OcclusionOutcome(layer_keys, cached=True)
            return
        try:
            table = read_concepts(self.store, self.dataset_key)
        except NotFound:
            raise FailedPrecondition(
                f"dataset {self.dataset_key!r} is not extracted: run Extract with the same "
                "dataset and image_chunk_size first", field="dataset"
            ) from None
        yield OcclusionProgress(0, 0, "finding the annotated regions")
        regions = sample_regions(
            pixel_regions(table, self.store), self.config.max_regions, self.config.seed
        )
        if len(regions) == 0:
            raise FailedPrecondition(
                "the probe dataset has no pixel-level concept to occlude", field="dataset"
            )
        yield from self._measure(table, regions, pending)
        yield OcclusionOutcome(layer_keys, cached=False)

    def _measure(
        self, table: ConceptTable, regions: np.ndarray, pending: list[str]
    ) -> Iterator[OcclusionProgress]:
        """Forward each image and its occluded copies in batches; store every layer."""
        start = time.perf_counter()
        model = self.model_source.load().to(self.device)
        check_layers(model, pending, self.model_source.label)
        size = self.requested_size or fixed_input_size(model) or self.dataset.image_size[0]
        prep = preprocessing(self.preprocessing_name, size)
        prefix = prefix_tokens_of(model)
        means: dict[str, list[torch.Tensor]] = {layer: [] for layer in pending}
        last_call: dict[str, torch.Tensor] = {}

        def on_output(layer: str, output: Any) -> None:
            # A module that runs several times in one pass reports its last call.
            grid = unit_map(output, prefix)
            if grid is not None:
                last_call[layer] = grid.float().mean(dim=(2, 3)).cpu()

        def forward(inputs: torch.Tensor) -> None:
            last_call.clear()
            with torch.inference_mode():
                tap(prep.normalize(inputs.to(self.device)))
            for layer in pending:
                means[layer].append(last_call[layer])

        labels = np.unique(regions[:, 1])
        column = {int(label): c for c, label in enumerate(labels)}
        tallies: dict[str, DeltaTally] = {}
        forward_passes, done, last = 0, 0, time.monotonic()

        def measure(inputs: list[torch.Tensor], tags: list[tuple[int, int]]) -> None:
            """Forward `inputs` in batches; add their regions' changes to the tallies."""
            for s0 in range(0, len(inputs), self.compute.batch_size):
                forward(torch.stack(inputs[s0 : s0 + self.compute.batch_size]))
            tag_array = np.asarray(tags)  # (n, 2): image, concept or -1 for the original
            originals = tag_array[:, 1] < 0
            first = {int(tag_array[k, 0]): k for k in np.flatnonzero(originals)}
            copies = np.flatnonzero(~originals)
            source = np.array([first[int(i)] for i in tag_array[copies, 0]])
            concepts = np.array([column[int(c)] for c in tag_array[copies, 1]])
            for layer in pending:
                out = torch.cat(means[layer]).double().numpy()  # (n, U)
                means[layer].clear()
                tally = tallies.setdefault(layer, DeltaTally(len(labels), out.shape[1]))
                tally.add(concepts, out[source], out[copies])

        with layer_tap(model, pending, on_output) as tap:
            with torch.inference_mode():
                tap.calibrate(torch.zeros(1, 3, size, size, device=self.device))
            missing = [layer for layer in pending if layer not in last_call]
            if missing:
                raise InvalidArgument(
                    f"{missing[0]!r} does not output a feature map in the forward pass",
                    field="layers",
                )
            # An image's copies follow it, so its original is always in the same call.
            inputs: list[torch.Tensor] = []
            tags: list[tuple[int, int]] = []
            for image, concepts, copies in self._image_inputs(table, regions, prep):
                inputs += copies
                tags += [(image, -1)] + [(image, c) for c in concepts]
                if len(inputs) >= self.compute.batch_size:
                    measure(inputs, tags)
                    forward_passes += len(inputs)
                    done += sum(c >= 0 for _, c in tags)
                    inputs, tags = [], []
                if time.monotonic() - last >= PROGRESS_INTERVAL_S:
                    last = time.monotonic()
                    yield OcclusionProgress(done, len(regions), "occluding")
            if inputs:
                measure(inputs, tags)
                forward_passes += len(inputs)
        seconds = time.perf_counter() - start
        for layer, tally in tallies.items():
            self.store.put_arrays(keys.occlusion(self.key, layer), {
                "labels": labels.astype(np.int32),
                "delta": tally.delta(),
                "regions": tally.regions,
                "cost": np.array([forward_passes, seconds]),
            })
        yield OcclusionProgress(len(regions), len(regions), "stored")

    def _image_inputs(
        self, table: ConceptTable, regions: np.ndarray, prep: Preprocessing
    ) -> Iterator[tuple[int, list[int], list[torch.Tensor]]]:
        """Per sampled image: its regions' concepts, it and its occluded copies (3, S, S) uint8.

        Images come in index order, so one stored label chunk is read at a time.
        """
        by_name = {row.name: row for row in self.dataset.rows}
        chunk: tuple[int, np.ndarray] | None = None
        for image in (int(i) for i in np.unique(regions[:, 0])):
            i0 = image - image % table.chunk_size
            if chunk is None or chunk[0] != i0:
                i1 = min(i0 + table.chunk_size, table.n_images)
                chunk = (i0, read_label_chunk(self.store, self.dataset_key, i0, i1).pixel)
            planes = torch.from_numpy(chunk[1][image - i0])  # (P, sh, sw)
            picture = self.dataset.load_image(by_name[table.image_names[image]])
            pixels = prep.resize(picture)
            blurred = None
            if self.config.fill == "blur":
                radius = max(1.0, prep.size * BLUR_FRACTION)
                sharp = Image.fromarray(pixels.permute(1, 2, 0).numpy())
                blurred = prep.resize(sharp.filter(ImageFilter.GaussianBlur(radius)))
            concepts = [int(label) for label in regions[regions[:, 0] == image, 1]]
            copies = [pixels]
            for label in concepts:
                area = (planes == label).any(dim=0).float()[None, None]
                mask = F.interpolate(area, size=(prep.size, prep.size), mode="nearest")[0, 0] > 0
                copies.append(occluded(pixels, mask, self.config.fill, prep, blurred))
            yield image, concepts, copies

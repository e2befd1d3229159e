"""The toy world (specs/toyworld.md): a generated probe dataset and models with known answers.

- `generate`: a Broden-format directory (images, label PNGs, CSVs, captions).
- `WORLD`: its vocabulary (colours and RGB, shapes, parts, textures, scenes, label numbers).
- `load_toynet`: a small CNN trained on the scene labels, cached by content key.
- `planted_model` / `planted_units`: a model whose units are colour detectors by construction.
- `load_toy_clip`: a tiny open_clip CLIP trained on toy phrases, cached by content key.
- `write_annotations`: MILANNOTATIONS-format data of concept-detector units.
"""

from services.toyworld.annotations import write_annotations
from services.toyworld.captions import caption, describe_shape, phrases
from services.toyworld.clip import (
    ClipRecipe,
    clip_normalize,
    load_toy_clip,
    toy_clip_metrics,
    toy_clip_path,
    zero_shot_accuracy,
)
from services.toyworld.generator import decode_labels, generate, label_planes
from services.toyworld.layout import ImageSpec, ShapeSpec, TextureSpec, sample_spec
from services.toyworld.planted import PlantedNet, planted_model, planted_units
from services.toyworld.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_normalize,
)
from services.toyworld.raster import Raster, rasterize, render_images
from services.toyworld.toynet import (
    ToyNet,
    ToyNetRecipe,
    load_toynet,
    toynet_metrics,
    toynet_path,
)
from services.toyworld.world import WORLD, Label, ToyWorld

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WORLD",
    "ClipRecipe",
    "ImageSpec",
    "Label",
    "PlantedNet",
    "Raster",
    "ShapeSpec",
    "TextureSpec",
    "ToyNet",
    "ToyNetRecipe",
    "ToyWorld",
    "caption",
    "clip_normalize",
    "decode_labels",
    "describe_shape",
    "generate",
    "imagenet_normalize",
    "label_planes",
    "load_toy_clip",
    "load_toynet",
    "phrases",
    "planted_model",
    "planted_units",
    "rasterize",
    "render_images",
    "sample_spec",
    "toy_clip_metrics",
    "toy_clip_path",
    "toynet_metrics",
    "toynet_path",
    "write_annotations",
    "zero_shot_accuracy",
]

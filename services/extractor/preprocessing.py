"""Named input preprocessing: `imagenet`, `netdissect` and `clip`.

Probe images are resized to a square input size, never cropped: activations must stay
aligned with the label masks. Resizing runs per image in the loader threads and yields
uint8 tensors; normalisation runs per batch on the compute device, so only uint8 pixels
cross to the accelerator.

- `imagenet`: torchvision's normalisation, (x/255 − [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225].
- `netdissect`: NetDissect-Lite's, (x − [124.6901, 118.6897, 109.5388]) / (255·0.224), RGB order.
- `clip`: OpenAI CLIP's mean and std with bicubic resizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from services.common.errors import InvalidArgument

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NETDISSECT_MEAN_RGB = (124.6901, 118.6897, 109.5388)
NETDISSECT_SCALE = 0.224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocessing:
    """A named preprocessing at one square input size.

    `mean` and `std` are per RGB channel on the [0, 1] scale.
    """

    name: str
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: Image.Resampling = Image.Resampling.BILINEAR

    def resize(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> (3, size, size) uint8 tensor, contiguous (stacks by memcpy)."""
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), self.resample)
        pixels = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> (B, 3, S, S) float32 model input, on the pixels' device.

        (x/255 − mean)/std computed as x·(1/(255·std)) + (−mean/std): two passes.
        """
        mean = torch.tensor(self.mean, dtype=torch.float64)
        std = torch.tensor(self.std, dtype=torch.float64)
        scale = (1.0 / (255.0 * std)).float().to(pixels.device).view(1, 3, 1, 1)
        offset = (-mean / std).float().to(pixels.device).view(1, 3, 1, 1)
        return torch.addcmul(offset, pixels.float(), scale)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> (3, size, size) float32 model input."""
        return self.normalize(self.resize(image).unsqueeze(0))[0]

    def identity(self) -> dict[str, object]:
        """What the preprocessing does, for content keys."""
        return {
            "name": self.name,
            "size": self.size,
            "mean": self.mean,
            "std": self.std,
            "resample": self.resample.name,
        }


PREPROCESSING = ("imagenet", "netdissect", "clip")


def check_preprocessing(name: str) -> None:
    """InvalidArgument (field `model.preprocessing`) unless `name` is a known preprocessing."""
    if name not in PREPROCESSING:
        allowed = ", ".join(repr(p) for p in PREPROCESSING)
        raise InvalidArgument(
            f"{name!r} is not a preprocessing; use one of {allowed} (empty: the model's default)",
            field="model.preprocessing",
        )


def preprocessing(name: str, size: int) -> Preprocessing:
    """The named preprocessing at input size `size` (pixels, square)."""
    check_preprocessing(name)
    if size < 1:
        raise InvalidArgument(f"{size} is not a positive size", field="model.input_size")
    if name == "imagenet":
        return Preprocessing(name, size, IMAGENET_MEAN, IMAGENET_STD)
    if name == "netdissect":
        mean = (
            NETDISSECT_MEAN_RGB[0] / 255.0,
            NETDISSECT_MEAN_RGB[1] / 255.0,
            NETDISSECT_MEAN_RGB[2] / 255.0,
        )
        scale = (NETDISSECT_SCALE, NETDISSECT_SCALE, NETDISSECT_SCALE)
        return Preprocessing(name, size, mean, scale)
    return Preprocessing(name, size, CLIP_MEAN, CLIP_STD, Image.Resampling.BICUBIC)

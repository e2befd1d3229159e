"""The model zoo: torchvision, timm, TorchScript and the toy world's models, never downloaded.

`resolve_model` is cheap: it checks the request, finds the weight file and computes the
model's identity (a content key over source, name, class count and the weight file's
sha256), enough to decide whether cached activations exist. `ModelSource.load` builds
the `nn.Module` in eval mode.

Weights come from:
- torchvision: `model.weights_uri`, else torch's cache,
  `torch.hub.get_dir()/checkpoints/<file name of the weights enum's DEFAULT url>`;
- timm: `model.weights_uri` (a state dict, checkpoint or .safetensors file);
- torchscript: `model.weights_uri`, the TorchScript archive itself;
- toy: `toynet`, trained by the toy world on first use and cached under its recipe's
  content key (or `model.weights_uri`); `planted`, built from code (no weights).

A state dict may be wrapped in a checkpoint dict under `state_dict` (or `model`);
`module.` prefixes left by DataParallel are stripped. Checkpoints load with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import difflib
import functools
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.settings import Settings
from services.extractor.local_paths import local_path
from services.toyworld import planted
from services.toyworld.planted import planted_model
from services.toyworld.toynet import ToyNet, ToyNetRecipe, load_toynet, toynet_key

MODEL_SOURCES = ("torchvision", "timm", "torchscript", "toy")
TOY_MODELS = ("toynet", "planted")
DEFAULT_INPUT_SIZE = 224
TOY_INPUT_SIZE = ToyNetRecipe().image_size

_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def weights_digest(path: Path) -> str:
    """sha256 of a weight file, remembered per (path, size, mtime) so big files hash once."""
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    with _DIGESTS_LOCK:
        if memo in _DIGESTS:
            return _DIGESTS[memo]
    digest = keys.file_digest(str(path))
    with _DIGESTS_LOCK:
        _DIGESTS[memo] = digest
    return digest


@dataclass(frozen=True)
class ModelSource:
    """A resolved model request: what to build, from which weights, and its identity."""

    source: str
    name: str
    identity: str
    default_preprocessing: str
    default_input_size: int
    builder: Callable[[], nn.Module] = field(repr=False, compare=False)
    # The same architecture without its trained weights, where loading could mean
    # training first (toynet): shapes are all DescribeModel needs.
    untrained: Callable[[], nn.Module] | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        """`source/name`, for messages."""
        return f"{self.source}/{self.name}"

    def load(self) -> nn.Module:
        """Build the model with its weights, in eval mode, on the CPU."""
        return self.builder().eval()

    def load_for_shapes(self) -> nn.Module:
        """A model with the right layer shapes, in eval mode, never training one first."""
        return (self.untrained or self.builder)().eval()


def fixed_input_size(model: nn.Module) -> int | None:
    """The one input size a model accepts (torchvision and timm ViTs), else None."""
    image_size = getattr(model, "image_size", None)
    if isinstance(image_size, int):
        return image_size
    config = getattr(model, "pretrained_cfg", None)
    if isinstance(config, dict) and config.get("fixed_input_size"):
        return int(config["input_size"][-1])
    return None


def resolve_model(
    source: str, name: str, weights_uri: str, num_classes: int, settings: Settings
) -> ModelSource:
    """Check a model request and find its weights; raise the error a user needs to fix it.

    Unknown source → InvalidArgument (`model.source`); unknown name → NotFound
    (`model.name`, with close matches); a weights path that does not exist → NotFound;
    no weights where they are needed (torch's cache empty, a timm model without a file)
    → FailedPrecondition naming where to put them.
    """
    if num_classes < 0:
        raise InvalidArgument(f"{num_classes} is negative", field="model.num_classes")
    weights = local_path(weights_uri, "model.weights_uri", settings) if weights_uri else None
    if source == "torchvision":
        return _torchvision(name, weights, num_classes)
    if source == "timm":
        return _timm(name, weights, num_classes)
    if source == "torchscript":
        return _torchscript(name, weights)
    if source == "toy":
        return _toy(name, weights, settings)
    allowed = ", ".join(repr(s) for s in MODEL_SOURCES)
    raise InvalidArgument(f"{source!r} is not a model source; use one of {allowed}", "model.source")


def _unknown_name(name: str, known: list[str], source: str, examples: list[str]) -> NotFound:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    shown = ", ".join(repr(c) for c in (close or examples))
    what = "close matches" if close else "e.g."
    return NotFound(f"{name!r} is not a {source} model; {what}: {shown}", "model.name")


def _torchvision(name: str, weights: Path | None, num_classes: int) -> ModelSource:
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        examples = ["resnet18", "resnet50", "alexnet", "vgg16", "vit_b_16", "convnext_tiny"]
        raise _unknown_name(name, known, "torchvision classification", examples)
    if weights is None:
        weights = _torch_cache_file(name)
    builder_kwargs: dict[str, Any] = {"weights": None}
    if num_classes:
        builder_kwargs["num_classes"] = num_classes

    def build() -> nn.Module:
        model = torchvision.models.get_model(name, **builder_kwargs)
        load_weights(model, weights, f"torchvision/{name}")
        return model

    identity = keys.content_key("torchvision", name, num_classes, weights_digest(weights))
    return ModelSource("torchvision", name, identity, "imagenet", DEFAULT_INPUT_SIZE, build)


def _torch_cache_file(name: str) -> Path:
    """Where torch's cache keeps `name`'s default weights; FailedPrecondition if absent."""
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, AttributeError):
        raise FailedPrecondition(
            f"torchvision/{name} has no published weights; give a local file in "
            "model.weights_uri (downloads are disabled)",
            field="model.weights_uri",
        ) from None
    path = directory / os.path.basename(url)
    if not path.is_file():
        raise FailedPrecondition(
            f"no weights for torchvision/{name}: put {os.path.basename(url)} in {directory} "
            "(torch's cache) or give a local file in model.weights_uri (downloads are disabled)",
            field="model.weights_uri",
        )
    return path


def _timm(name: str, weights: Path | None, num_classes: int) -> ModelSource:
    import timm

    if not timm.is_model(name):
        examples = ["resnet50", "vit_base_patch16_224", "convnext_tiny", "efficientnet_b0"]
        raise _unknown_name(name, timm.list_models(), "timm", examples)
    if weights is None:
        raise FailedPrecondition(
            f"timm/{name} needs a local weights file (state dict, checkpoint or .safetensors) "
            "in model.weights_uri; downloads are disabled",
            field="model.weights_uri",
        )
    kwargs: dict[str, Any] = {"pretrained": False}
    if num_classes:
        kwargs["num_classes"] = num_classes
    size = timm.get_pretrained_cfg_value(name, "input_size")
    default_size = int(size[-1]) if size else DEFAULT_INPUT_SIZE
    mean = timm.get_pretrained_cfg_value(name, "mean")
    preprocessing = "clip" if mean and abs(float(mean[0]) - 0.4815) < 1e-3 else "imagenet"

    def build() -> nn.Module:
        model = timm.create_model(name, **kwargs)
        load_weights(model, weights, f"timm/{name}")
        return model

    identity = keys.content_key("timm", name, num_classes, weights_digest(weights))
    return ModelSource("timm", name, identity, preprocessing, default_size, build)


def _torchscript(name: str, weights: Path | None) -> ModelSource:
    if weights is None:
        raise InvalidArgument(
            "a TorchScript model is its file: set model.weights_uri", field="model.weights_uri"
        )
    path = weights

    def build() -> nn.Module:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*")
            try:
                return torch.jit.load(str(path), map_location="cpu")
            except RuntimeError as exc:
                raise InvalidArgument(
                    f"{str(path)!r} is not a TorchScript archive: {exc}", "model.weights_uri"
                ) from None

    identity = keys.content_key("torchscript", weights_digest(path))
    label = name or path.name
    return ModelSource("torchscript", label, identity, "imagenet", DEFAULT_INPUT_SIZE, build)


def _toy(name: str, weights: Path | None, settings: Settings) -> ModelSource:
    """`toynet` (its weights ship with the toy world) or `planted` (built)."""
    if name == "planted":
        if weights is not None:
            raise InvalidArgument("the planted model has no weights to load", "model.weights_uri")
        # Built from code alone: its source file is its identity.
        identity = keys.content_key("toy", name, keys.file_digest(planted.__file__))
        return ModelSource("toy", name, identity, "imagenet", TOY_INPUT_SIZE, planted_model)
    if name != "toynet":
        allowed = ", ".join(repr(n) for n in TOY_MODELS)
        raise NotFound(f"{name!r} is not a toy model; use one of {allowed}", "model.name")
    recipe = ToyNetRecipe()
    cache_dir = Path(settings.cache_dir)
    path = weights

    def build() -> nn.Module:
        if path is None:
            return load_toynet(cache_dir, recipe)
        model = ToyNet(recipe.widths)
        load_weights(model, path, "toy/toynet")
        return model

    trained = toynet_key(recipe) if path is None else weights_digest(path)
    identity = keys.content_key("toy", name, trained)
    return ModelSource(
        "toy", name, identity, "imagenet", TOY_INPUT_SIZE, build,
        untrained=functools.partial(ToyNet, recipe.widths) if path is None else None,
    )


def read_state_dict(path: Path, field: str = "model.weights_uri") -> dict[str, torch.Tensor]:
    """The tensors of a weight file: .safetensors, a state dict, or a checkpoint holding one.

    Checkpoints load with `torch.load(weights_only=True)`; a `state_dict` (or `model`)
    entry is unwrapped and `module.` prefixes are stripped.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InvalidArgument(
                f"{str(path)!r} is not a loadable PyTorch checkpoint: {exc}", field=field
            ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidArgument(
            f"{str(path)!r} holds no state dict (a mapping of names to tensors)", field=field
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(
    model: nn.Module, path: Path, label: str, field: str = "model.weights_uri"
) -> None:
    """Load the weight file at `path` into `model`, strictly; InvalidArgument on mismatch."""
    state = read_state_dict(path, field)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).replace("\n", " ")[:600]
        raise InvalidArgument(f"{path.name} does not fit {label}: {detail}", field=field) from None

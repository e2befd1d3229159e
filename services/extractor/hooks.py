"""Reading layer outputs during a forward pass, by module path.

Two taps give the same result, `{layer: output}` per forward call:

- `HookTap` registers forward hooks on ordinary `nn.Module`s. After one calibration
  pass it knows how often each hooked module runs and stops the forward pass as soon
  as every requested layer has produced its last output, so dissecting `layer1` never
  pays for `layer4`.
- `ScriptTap` serves TorchScript modules, which refuse Python hooks: it rewrites the
  method graphs so that the call of each requested submodule also stores a clone of its
  output in an attribute of the calling module, read back after the forward pass.

A module that runs several times in one forward pass (torchvision's ResNet blocks reuse
one `relu`) reports its last call. Outputs are handed to a callback inside the hook,
before later in-place operations (`ReLU(inplace=True)`) can change them.

`unit_map` turns any layer output into the stored (B, U, h, w) layout: conv maps as
they are; ViT tokens (B, P+T, C) → (B, C, √T, √T) without the P prefix (class) tokens;
linear outputs (B, C) → (B, C, 1, 1).
"""

from __future__ import annotations

import abc
import contextlib
import difflib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from services.common.errors import InvalidArgument

# (layer name, raw module output) -> None; called once per module call.
OutputCallback = Callable[[str, Any], None]


class _StopForward(Exception):
    """Raised from a hook once every requested layer has produced its output."""


def unit_map(output: Any, prefix_tokens: int | None = None) -> torch.Tensor | None:
    """A layer output as (B, U, h, w), or None when it is not a feature map.

    (B, C, h, w) is returned as is; (B, P+T, C) token sequences drop the P prefix
    tokens (`prefix_tokens`, else 1 when T = L−1 is square, else 0 when L is square)
    and become (B, C, √T, √T); (B, C) becomes (B, C, 1, 1).
    """
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return None
    if output.dim() == 4:
        return output
    if output.dim() == 2:
        return output[:, :, None, None]
    if output.dim() != 3:
        return None
    tokens = output.shape[1]
    if prefix_tokens is None:
        prefix_tokens = next(
            (p for p in (1, 0) if tokens - p > 0 and _is_square(tokens - p)), -1
        )
    side = math.isqrt(tokens - prefix_tokens) if 0 <= prefix_tokens < tokens else 0
    if side == 0 or side * side != tokens - prefix_tokens:
        return None
    grid = output[:, prefix_tokens:, :].transpose(1, 2)
    return grid.reshape(output.shape[0], output.shape[2], side, side)


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def prefix_tokens_of(model: nn.Module) -> int | None:
    """The number of prefix (class, register) tokens a timm ViT declares, else None."""
    count = getattr(model, "num_prefix_tokens", None)
    return count if isinstance(count, int) else None


def module_paths(model: nn.Module) -> list[str]:
    """Every named submodule's path, in registration order (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def check_layers(model: nn.Module, layers: Sequence[str], model_name: str) -> None:
    """Raise InvalidArgument (field `layers`) for a name that is no module path of `model`."""
    known = module_paths(model)
    names = set(known)
    if not layers:
        raise InvalidArgument("at least one layer is required", field="layers")
    for layer in layers:
        if layer in names:
            continue
        close = difflib.get_close_matches(layer, known, n=5, cutoff=0.5)
        hint = (
            "close matches: " + ", ".join(repr(c) for c in close)
            if close
            else f"it has {len(known)} modules, e.g. " + ", ".join(repr(k) for k in known[-5:])
        )
        raise InvalidArgument(f"{model_name} has no module {layer!r}; {hint}", field="layers")


class LayerTap(abc.ABC):
    """Runs a model and hands the outputs of chosen layers to a callback."""

    def __init__(self, model: nn.Module, layers: Sequence[str], callback: OutputCallback) -> None:
        self.model = model
        self.layers = list(layers)
        self.callback = callback

    @abc.abstractmethod
    def __call__(self, inputs: torch.Tensor) -> None:
        """Run the model on (B, 3, S, S) inputs, calling back once per layer call."""

    def calibrate(self, inputs: torch.Tensor) -> None:
        """A first, complete forward pass (the dry run); taps may learn from it."""
        self(inputs)

    @abc.abstractmethod
    def close(self) -> None:
        """Remove whatever the tap installed."""

    def __enter__(self) -> LayerTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HookTap(LayerTap):
    """Forward hooks on an `nn.Module`, with early stopping once calibrated.

    `calibrate` runs a full forward pass counting each layer's calls; later calls stop
    the forward pass when every layer has run that many times.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], callback: OutputCallback) -> None:
        super().__init__(model, layers, callback)
        modules = dict(model.named_modules())
        self._calls: dict[str, int] = dict.fromkeys(self.layers, 0)
        self._expected: dict[str, int] | None = None
        self._handles = [
            modules[layer].register_forward_hook(self._hook(layer)) for layer in self.layers
        ]

    def _hook(self, layer: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._calls[layer] += 1
            self.callback(layer, output)
            expected = self._expected
            if expected is not None and all(
                self._calls[name] >= count for name, count in expected.items()
            ):
                raise _StopForward

        return hook

    def calibrate(self, inputs: torch.Tensor) -> None:
        """Run a full forward pass and remember how often each layer runs."""
        self._expected = None
        self(inputs)
        if all(count > 0 for count in self._calls.values()):
            self._expected = dict(self._calls)

    def __call__(self, inputs: torch.Tensor) -> None:
        """Run the model on (B, 3, S, S) inputs, stopping after the last hooked output."""
        self._calls = dict.fromkeys(self.layers, 0)
        with contextlib.suppress(_StopForward):
            self.model(inputs)

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ScriptTap(LayerTap):
    """Output capture for TorchScript modules by rewriting their method graphs.

    For layer `a.b.c` the nearest ancestor whose methods call `c` (or `b.c`, …) gets,
    after that call, `self.<attr> = clone(output)`; the clone keeps later in-place ops
    from changing it. Graphs are shared by every instance of a TorchScript class, so each
    instance stores its own output in its own slot. Instrumentation is permanent for the
    loaded module: load a fresh copy for a different set of layers.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], callback: OutputCallback) -> None:
        super().__init__(model, layers, callback)
        self._modules = dict(model.named_modules())
        self._slots: dict[str, tuple[str, str]] = {}
        for layer in self.layers:
            slot = self._instrument(layer)
            if slot is not None:
                self._slots[layer] = slot

    def _instrument(self, layer: str) -> tuple[str, str] | None:
        """Instrument the call of `layer`; return (owner path, attribute) or None."""
        parts = layer.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            owner_path, relative = ".".join(parts[:cut]), parts[cut:]
            owner = self._modules[owner_path]
            attribute = "_neurodissect_out_" + "__".join(relative)
            script = owner._c
            if script.hasattr(attribute):
                return owner_path, attribute
            calls = [
                (graph, node)
                for name in script._method_names()
                for graph in [script._get_method(name).graph]
                for node in _nodes(graph.block())
                if _calls_submodule(node, next(graph.inputs()), relative)
            ]
            if not calls:
                continue
            script._register_attribute(attribute, torch._C.TensorType.get(), torch.empty(0))
            for graph, node in calls:
                _store_clone_after(graph, node, attribute)
            return owner_path, attribute
        return None

    def close(self) -> None:
        """Nothing to remove: the graph rewrite lasts as long as the loaded module."""

    def __call__(self, inputs: torch.Tensor) -> None:
        """Run the model on (B, 3, S, S) inputs and report every captured layer."""
        for owner_path, attribute in self._slots.values():
            self._modules[owner_path]._c.setattr(attribute, torch.empty(0))
        self.model(inputs)
        for layer, (owner_path, attribute) in self._slots.items():
            value = self._modules[owner_path]._c.getattr(attribute)
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                self.callback(layer, value)


def _nodes(block: Any) -> Iterator[Any]:
    """Every node of a graph block, nested blocks (if/loop bodies) included."""
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _nodes(inner)


def _calls_submodule(node: Any, self_value: Any, relative: list[str]) -> bool:
    """Whether `node` calls `self.<relative path>.forward` with a tensor result."""
    if node.kind() != "prim::CallMethod" or node.s("name") != "forward":
        return False
    if node.outputsSize() != 1 or not isinstance(node.output().type(), torch._C.TensorType):
        return False
    value, names = node.inputsAt(0), []
    while value.node().kind() == "prim::GetAttr":
        names.append(value.node().s("name"))
        value = value.node().inputsAt(0)
    return value == self_value and names[::-1] == relative


def _store_clone_after(graph: Any, node: Any, attribute: str) -> None:
    """Insert `self.<attribute> = output.clone()` right after `node`."""
    none = graph.insertConstant(None)
    none.node().moveAfter(node)
    clone = graph.create("aten::clone", [node.output(), none])
    clone.output().setType(node.output().type())
    clone.insertAfter(none.node())
    store = graph.create("prim::SetAttr", [next(graph.inputs()), clone.output()], 0)
    store.s_("name", attribute)
    store.insertAfter(clone)


def is_torchscript(model: nn.Module) -> bool:
    """Whether `model` is a TorchScript module (no Python hooks)."""
    return isinstance(model, torch.jit.ScriptModule)


def layer_tap(model: nn.Module, layers: Sequence[str], callback: OutputCallback) -> LayerTap:
    """The tap that fits `model`: forward hooks, or graph rewriting for TorchScript."""
    if is_torchscript(model):
        return ScriptTap(model, layers, callback)
    return HookTap(model, layers, callback)


@dataclass(frozen=True)
class LayerShape:
    """One module's output: stored (U, h, w) shape (empty if not a feature map) and raw shape."""

    name: str
    shape: tuple[int, ...]
    raw_shape: tuple[int, ...]
    module_type: str


def describe(model: nn.Module, inputs: torch.Tensor) -> list[LayerShape]:
    """Every named module's output shape from one forward pass on (1, 3, S, S) `inputs`.

    Modules that do not run, or whose output is not a tensor, get empty shapes.
    """
    modules = dict(model.named_modules())
    raw: dict[str, tuple[int, ...]] = {}
    stored: dict[str, tuple[int, ...]] = {}
    prefix = prefix_tokens_of(model)

    def record(layer: str, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            raw[layer] = tuple(output.shape[1:])
            grid = unit_map(output, prefix)
            stored[layer] = tuple(grid.shape[1:]) if grid is not None else ()

    names = module_paths(model)
    with layer_tap(model, names, record) as tap, torch.inference_mode():
        tap(inputs)
    return [
        LayerShape(
            name=name,
            shape=stored.get(name, ()),
            raw_shape=raw.get(name, ()),
            module_type=str(
                getattr(modules[name], "original_name", None) or type(modules[name]).__name__
            ),
        )
        for name in names
    ]

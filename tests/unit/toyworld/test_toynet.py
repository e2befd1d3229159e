from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.toyworld import toynet
from services.toyworld.toynet import (
    LAYERS,
    ToyNet,
    ToyNetRecipe,
    load_toynet,
    toynet_key,
    toynet_metrics,
    toynet_path,
)
from services.toyworld.world import WORLD

# Small enough for a unit test (a few seconds on two cores), big enough to learn colours.
SMALL = ToyNetRecipe(n_images=640, image_size=32, eval_images=200, epochs=4, widths=(8, 16, 32, 32))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_layers_and_shapes() -> None:
    model = ToyNet()
    shapes: dict[str, tuple[int, ...]] = {}
    for name in LAYERS:
        module = getattr(model, name)
        module.register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
    model(torch.zeros(2, 3, 64, 64))
    assert shapes == {
        "conv1": (2, 16, 64, 64),
        "layer1": (2, 32, 32, 32),
        "layer2": (2, 64, 16, 16),
        "layer3": (2, 64, 8, 8),
        "fc": (2, len(WORLD.scenes)),
    }


def test_trains_well_above_chance_and_is_cached(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = toynet_metrics(cache, SMALL)
    assert metrics["accuracy"] > 5 * metrics["chance"]
    path = toynet_path(cache, SMALL)
    state = torch.load(path, weights_only=True)
    assert set(state) == set(ToyNet(SMALL.widths).state_dict())

    def fail(_recipe: ToyNetRecipe) -> Any:
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(toynet, "train_toynet", fail)
    model = load_toynet(cache, SMALL)
    assert not model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_training_is_deterministic() -> None:
    tiny = ToyNetRecipe(n_images=64, eval_images=16, epochs=1, widths=(4, 4, 4, 4))
    first, _ = toynet.train_toynet(tiny)
    second, _ = toynet.train_toynet(tiny)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cached_weights_do_not_depend_on_the_callers_threads(tmp_path: Path) -> None:
    # Trained directly, the weights differ with the thread count (kernels sum in another
    # order); through the cache, training always runs with TRAINING_THREADS.
    recipe = ToyNetRecipe(n_images=128, eval_images=16, epochs=1, widths=(8, 16, 32, 32))
    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            weights.append(load_toynet(tmp_path / str(threads), recipe).state_dict())
            assert torch.get_num_threads() == threads  # the caller's count is restored
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_key_changes_with_the_recipe() -> None:
    assert toynet_key(SMALL) == toynet_key(ToyNetRecipe(**vars(SMALL)))
    assert toynet_key(SMALL) != toynet_key(ToyNetRecipe(n_images=641))
    assert toynet_key(ToyNetRecipe()) != toynet_key(ToyNetRecipe(widths=(8, 16, 32, 32)))


def test_default_cache_dir_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEURODISSECT_CACHE_DIR", str(tmp_path))
    assert toynet_path(recipe=SMALL).parent == tmp_path / "toyworld"  # the default one ships

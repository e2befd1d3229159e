"""Spec files a user may get wrong in every way: each is an InvalidArgument naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.main import EXIT_REJECTED, main
from services.common.errors import InvalidArgument, NotFound
from services.gateway.spec_file import (
    MAX_SPEC_BYTES,
    MAX_SPEC_DEPTH,
    MAX_SPEC_VALUES,
    load_spec,
)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("name", "text"), [
    ("deep.json", "[" * 100_000 + "]" * 100_000),
    ("deep.json", '{"model": ' * 50 + "{}" + "}" * 50),
    ("deep.yaml", "[" * 10_000 + "]" * 10_000),
    ("deep.yaml", "a:\n" + "".join(" " * k + "- \n" for k in range(1, 40))),
])
def test_deep_nesting_is_refused_naming_the_limit(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"^spec: .*deeper than {MAX_SPEC_DEPTH} levels"):
        load_spec(_write(tmp_path, name, text))


def test_a_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 10) + "]" for k in range(1, 8)]
    with pytest.raises(InvalidArgument, match=rf"more than {MAX_SPEC_VALUES} values"):
        load_spec(_write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n"))


@pytest.mark.parametrize(("text", "field"), [
    ("compute: {batch_size: 4294967301}", "compute.batch_size"),
    ("compute: {batchSize: -4294967301}", "compute.batchSize"),
    ("dataset: {toyworld: {n_images: 2147483648}}", "dataset.toyworld.n_images"),
    ("dataset: {limit: 18446744073709551616}", "dataset.limit"),
])
def test_integers_out_of_range_are_refused_not_truncated(
    tmp_path: Path, text: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_spec(_write(tmp_path, "spec.yaml", text))
    assert caught.value.field == field and "out of range" in str(caught.value)


@pytest.mark.parametrize("text", [
    "1: x", "? [a, b]\n: c", "model: {name: 2020-01-01}", "- a\n- b", "42", "layers: {a: 1}",
    "model: !!binary aGVsbG8=", "\x00", "name: [1, 2]", "{{", "layers: [[[[]]]]",
])
def test_odd_yaml_is_invalid_argument(tmp_path: Path, text: str) -> None:
    with pytest.raises(InvalidArgument):
        load_spec(_write(tmp_path, "spec.yaml", text))


def test_size_encoding_and_missing_files(tmp_path: Path) -> None:
    big = _write(tmp_path, "big.yaml", "name: " + "x" * MAX_SPEC_BYTES)
    with pytest.raises(InvalidArgument, match=r"larger than"):
        load_spec(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(InvalidArgument, match=r"not valid JSON/YAML"):
        load_spec(latin)
    with pytest.raises(NotFound):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(NotFound):
        load_spec(tmp_path)


def test_the_cli_exits_2_on_a_deep_spec_and_on_out_of_range_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = _write(tmp_path, "deep.json", "[" * 100_000 + "]" * 100_000)
    assert main(["submit", str(deep)]) == EXIT_REJECTED
    assert f"INVALID_ARGUMENT: spec: the spec nests deeper than {MAX_SPEC_DEPTH}" in (
        capsys.readouterr().err)
    assert main(["submit", "--batch-size", str(2**32 + 5)]) == EXIT_REJECTED
    assert "INVALID_ARGUMENT: compute.batch_size: 4294967301" in capsys.readouterr().err

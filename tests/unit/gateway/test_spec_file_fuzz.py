"""Property-based fuzzing of the spec file parser (Hypothesis).

Whatever a spec file holds (generated JSON and YAML documents, a valid spec mutated at
every numeric limit, raw bytes), `load_spec` returns a DissectionSpec or raises one of
the project's errors (the CLI's exit 2), never anything else.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st
from neurodissect.v1 import common_pb2

from services.common.errors import NeurodissectError
from services.gateway.spec_file import load_spec
from tests.fixtures.fuzzing import examples, mutated, mutations

SPEC = common_pb2.DissectionSpec(
    model=common_pb2.ModelSpec(source="toy", name="toynet"), layers=["conv1"],
    dataset=common_pb2.DatasetSpec(kind="toyworld"), netdissect=common_pb2.NetDissectParams())
FIELD_NAMES = sorted({f.name for f in common_pb2.DissectionSpec.DESCRIPTOR.fields}
                     | {"toyworld", "n_images", "batch_size", "batchSize", "limit", "uri"})

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _parse(name: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        with contextlib.suppress(NeurodissectError):
            assert isinstance(load_spec(path), common_pb2.DissectionSpec)


@examples(60)
@given(document=json_values, suffix=st.sampled_from([".json", ".yaml"]))
def test_generated_documents(document: Any, suffix: str) -> None:
    text = json.dumps(document) if suffix == ".json" else yaml.safe_dump(document)
    _parse(f"spec{suffix}", text.encode())


@examples(60)
@given(changes=mutations(SPEC), suffix=st.sampled_from([".json", ".yaml"]))
def test_mutated_valid_specs(changes: list[tuple[str, Any]], suffix: str) -> None:
    data = json_format.MessageToDict(mutated(SPEC, changes))
    text = json.dumps(data) if suffix == ".json" else yaml.safe_dump(data)
    _parse(f"spec{suffix}", text.encode())


@examples(60)
@given(content=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       suffix=st.sampled_from([".json", ".yaml", ".yml"]))
def test_arbitrary_bytes(content: bytes, suffix: str) -> None:
    _parse(f"spec{suffix}", content)

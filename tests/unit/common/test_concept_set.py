"""The one concept set reader, as the gateway uses it at submission."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.concept_set import MAX_CONCEPT_SET_BYTES, MAX_TEXT_CHARS, read_concept_set
from services.common.errors import InvalidArgument

FIELD = "clip_dissect.concept_set_uri"


def test_lines_are_concepts_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbfdog\r\n\r\n cat \rsky\n")
    assert read_concept_set(path, FIELD) == ["dog", "cat", "sky"]


@pytest.mark.parametrize(("content", "message"), [
    (b"", "holds no concepts"),
    (b"\n \r\n\t\n", "holds no concepts"),
    (b"caf\xe9\n", "not UTF-8"),
    (b"x" * (MAX_TEXT_CHARS + 1), "characters; at most"),
])
def test_bad_files_are_refused_naming_the_field(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(content)
    with pytest.raises(InvalidArgument, match=rf"^{FIELD}.*{message}"):
        read_concept_set(path, FIELD)


def test_directories_and_oversized_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"is a directory"):
        read_concept_set(tmp_path, FIELD)
    big = tmp_path / "big.txt"
    with big.open("wb") as handle:
        handle.truncate(MAX_CONCEPT_SET_BYTES + 1)
    with pytest.raises(InvalidArgument, match=r"larger than"):
        read_concept_set(big, FIELD)

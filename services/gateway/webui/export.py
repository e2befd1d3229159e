"""The static copy of a job's pages: every page and picture, written through one `put`.

The REPORTING stage writes it into the store under `reports/{job_id}/`, and
`neurodissect report` downloads that folder (or builds it from the store when the
job has none yet), so a copy reads the same from any store, without the stack.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from neurodissect.v1 import common_pb2

from services.common import keys
from services.common.store import ObjectStore
from services.gateway.webui.pages import Page, PageBuilder, image_file, table_file

Put = Callable[[str, bytes], None]


def job_pages(builder: PageBuilder, job: common_pb2.Job) -> Iterator[Page]:
    """The job page, the search page, and every layer's page and unit pages."""
    yield builder.job_page(job)
    yield builder.search_page(job)
    for layer in job.spec.layers:
        yield builder.layer_page(job, layer)
        for unit in builder.reader.units(job, layer):
            yield builder.unit_page(job, unit)


def write_tables(builder: PageBuilder, job: common_pb2.Job, put: Put) -> int:
    """Write each layer's table, which the server reads for a finished job's layer pages.

    Returns the number of files written.
    """
    for layer in job.spec.layers:
        table = builder.layer_table(job, layer)
        put(table_file(layer), json.dumps(table, separators=(",", ":"), allow_nan=False).encode())
    return len(job.spec.layers)


def write_copy(builder: PageBuilder, job: common_pb2.Job, put: Put) -> int:
    """Write every page of `job`, each picture they show once, and the layers' tables.

    Returns the number of files written.
    """
    files = write_tables(builder, job, put)
    written: set[str] = set()
    for page in job_pages(builder, job):
        put(page.name, page.html.encode())
        files += 1
        for digest in page.images:
            if digest not in written:
                put(image_file(digest), builder.renders.get(digest))
                written.add(digest)
    return files + len(written)


def store_put(store: ObjectStore, job_id: str) -> Put:
    """A `put` into the job's report folder of the store."""
    return lambda name, data: store.put(keys.report(job_id, name), data)


def directory_put(root: Path) -> Put:
    """A `put` into a local directory."""

    def put(name: str, data: bytes) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return put


def download_copy(store: ObjectStore, job_id: str, put: Put) -> int:
    """Copy the stored report folder of a job through `put`; return the objects copied."""
    prefix = keys.report_prefix(job_id)
    copied = 0
    for key in store.list(prefix):
        put(key[len(prefix):], store.get(key))
        copied += 1
    return copied

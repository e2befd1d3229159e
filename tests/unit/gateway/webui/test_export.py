from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

from services.common import keys
from services.common.store import LocalStore
from services.gateway.webui.commands import copy_report
from services.gateway.webui.figures import UNIT_EXEMPLARS
from tests.fixtures.wide_layer import write_wide_job

UNITS = 12


def _links(page: str) -> list[str]:
    return [unquote(link) for link in re.findall(r"(?:href|src)='([^']+)'", page)
            if not link.startswith("data:")]


def test_a_static_copy_is_built_from_the_store_and_every_link_resolves(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    job_id = write_wide_job(store, n_units=UNITS, n_images=30)
    out = tmp_path / "copy"

    files, stored = copy_report(store, job_id, out)

    assert not stored  # the fixture stored only the layer tables, not the pages
    pages = sorted(out.glob("*.html"))
    assert {p.name for p in pages} == {"index.html", "search.html", "layer-conv.html"} | {
        f"unit-conv-{u}.html" for u in range(UNITS)}
    assert files == len(list(out.rglob("*.*")))
    for page in pages:
        for link in _links(page.read_text()):
            assert (out / link).is_file(), (page.name, link)
    unit_page = (out / "unit-conv-3.html").read_text()
    assert unit_page.count("<figure class=exemplar") == UNIT_EXEMPLARS
    assert unit_page.count("class='overlay unit'") == UNIT_EXEMPLARS
    assert "SUCCEEDED" in (out / "index.html").read_text()


def test_a_finished_jobs_stored_copy_is_downloaded_as_it_is(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    job_id = write_wide_job(store, n_units=UNITS, n_images=30)
    store.put(keys.report(job_id, "index.html"), b"<p>stored</p>")

    files, stored = copy_report(store, job_id, tmp_path / "copy")

    assert stored and files == len(store.list(keys.report_prefix(job_id)))
    assert (tmp_path / "copy" / "index.html").read_bytes() == b"<p>stored</p>"
    assert (tmp_path / "copy" / "tables" / "conv.json").is_file()

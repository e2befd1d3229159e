"""The web UI's HTTP server, run by the gateway process on `settings.ui_port`.

```
GET  /                              jobs, with state, progress and ETA (live)
GET  /api/jobs.json                 the same as JSON, which the jobs page polls
GET  /jobs/{id}/index.html          job: spec, stages, per-layer summaries and plots
GET  /jobs/{id}/layer-{L}.html      layer: every unit, sortable and filterable
GET  /jobs/{id}/unit-{L}-{U}.html   unit: every answer, exemplars with masks
GET  /jobs/{id}/search.html         units by concept, caption or formula words
GET  /jobs/{id}/img/{digest}.png    a stored picture (immutable)
GET  /login, POST /login            the token form (when an auth token is set)
```

With `settings.auth_token` set, every request but the login form needs the session
cookie that a right token sets (an HMAC of the token, never the token itself) or an
`Authorization: Bearer` header with the token.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import re
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from neurodissect.v1 import common_pb2

from services.common.errors import InvalidArgument, NeurodissectError, NotFound
from services.common.settings import Settings
from services.gateway.jobs import TERMINAL
from services.gateway.webui import pages
from services.gateway.webui.data import JobReader, Lru
from services.gateway.webui.pages import PageBuilder
from services.gateway.webui.render import Renders

log = logging.getLogger(__name__)

COOKIE = "neurodissect_session"
# Built layer and search pages of finished jobs kept in memory.
PAGES_KEPT = 16
# Form posts are small: a token and a path.
MAX_FORM_BYTES = 8192

_JOB_PAGE = re.compile(r"^/jobs/([^/]+)/(.*)$")
_UNIT_PAGE = re.compile(r"^unit-(.+)-(\d+)\.html$")
_LAYER_PAGE = re.compile(r"^layer-(.+)\.html$")
_IMAGE = re.compile(r"^img/([0-9a-f]{24})\.png$")


def session_value(token: str) -> str:
    """The session cookie's value for `token`."""
    return hmac.new(token.encode(), b"neurodissect web ui session", hashlib.sha256).hexdigest()


class WebUI:
    """The HTTP server of the pages; `start()` binds and serves on a thread."""

    def __init__(self, settings: Settings, reader: JobReader) -> None:
        self.settings = settings
        self.reader = reader
        self.renders = Renders(reader.store)
        self.builder = PageBuilder(reader, self.renders, live=True)
        self._pages = Lru(PAGES_KEPT)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The root URL the UI is served at."""
        assert self._server is not None, "not started"
        port = self._server.server_address[1]
        return f"http://{self.settings.host}:{port}/"

    def start(self) -> WebUI:
        """Bind `settings.host:settings.ui_port` and serve on a daemon thread."""
        ui = self

        class Handler(_Handler):
            web = ui

        self._server = ThreadingHTTPServer((self.settings.host, self.settings.ui_port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="web-ui", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def authorised(self, cookie_header: str, authorization: str) -> bool:
        """Tell whether a request's cookie or bearer header carries the token (or none is set)."""
        token = self.settings.auth_token
        if not token:
            return True
        if authorization.startswith("Bearer ") and hmac.compare_digest(
            authorization[len("Bearer "):].encode(), token.encode()
        ):
            return True
        expected = session_value(token)
        for part in cookie_header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), expected.encode()):
                return True
        return False

    def _finished(
        self, job: common_pb2.Job, name: str, build: Callable[[common_pb2.Job], pages.Page]
    ) -> bytes:
        """A page that reads every unit of a layer, built once when the job has ended."""
        if job.state not in TERMINAL:
            return build(job).html.encode()
        version = job.updated_at.ToNanoseconds()
        return self._pages.get((job.id, name, version), lambda: build(job).html.encode())

    def page(self, path: str) -> tuple[str, bytes, bool]:
        """(content type, body, immutable) of a GET path; NotFound or InvalidArgument."""
        if path == "/":
            return "text/html", pages.jobs_page(self.reader.list_jobs()).encode(), False
        if path == "/api/jobs.json":
            body = json.dumps(pages.jobs_json(self.reader.list_jobs())).encode()
            return "application/json", body, False
        match = _JOB_PAGE.match(path)
        if not match:
            raise NotFound(f"no page {path!r}", "path")
        job = self.reader.job(match.group(1))
        name = match.group(2)
        if image := _IMAGE.match(name):
            return "image/png", self.renders.get(image.group(1)), True
        if name == "index.html":
            return "text/html", self.builder.job_page(job).html.encode(), False
        if name == "search.html":
            return "text/html", self._finished(job, name, self.builder.search_page), False
        if layer_match := _LAYER_PAGE.match(name):
            layer = _job_layer(job.spec.layers, layer_match.group(1))
            build = functools.partial(self.builder.layer_page, layer=layer)
            return "text/html", self._finished(job, name, build), False
        if unit_match := _UNIT_PAGE.match(name):
            layer = _job_layer(job.spec.layers, unit_match.group(1))
            unit = self.reader.unit(job, layer, int(unit_match.group(2)))
            return "text/html", self.builder.unit_page(job, unit).html.encode(), False
        raise NotFound(f"no page {name!r} of job {job.id}", "path")


def _job_layer(layers: Any, layer: str) -> str:
    if layer not in layers:
        raise NotFound(f"the job has no layer {layer!r}", "layer")
    return layer


class _Handler(BaseHTTPRequestHandler):
    web: WebUI
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("web ui: " + format, *args)

    def _send(
        self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8"
                         if content_type.startswith("text/") else content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _redirect(self, location: str, headers: dict[str, str] | None = None) -> None:
        self._send(
            HTTPStatus.SEE_OTHER, "text/plain", b"", {"Location": location, **(headers or {})}
        )

    def do_GET(self) -> None:
        """Serve a page, a picture or the jobs JSON."""
        url = urlsplit(self.path)
        path = unquote(url.path)
        if path == "/login":
            query = parse_qs(url.query)
            failed = "failed" in query
            next_path = query.get("next", ["/"])[0]
            self._send(HTTPStatus.OK, "text/html", pages.login_page(next_path, failed).encode())
            return
        if not self.web.authorised(self.headers.get("Cookie", ""),
                                   self.headers.get("Authorization", "")):
            self._redirect(f"/login?next={url.path}")
            return
        if _JOB_PAGE.match(path) and path.count("/") == 2:
            self._redirect(path.rstrip("/") + "/index.html")
            return
        try:
            content_type, body, immutable = self.web.page(path)
        except NotFound as exc:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", f"not found: {exc}".encode())
            return
        except InvalidArgument as exc:
            self._send(HTTPStatus.BAD_REQUEST, "text/plain", f"bad request: {exc}".encode())
            return
        except NeurodissectError as exc:
            log.warning("web ui: %s: %s", path, exc)
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "text/plain", str(exc).encode())
            return
        cache = "public, max-age=31536000, immutable" if immutable else "no-store"
        self._send(HTTPStatus.OK, content_type, body, {"Cache-Control": cache})

    do_HEAD = do_GET  # noqa: N815

    def do_POST(self) -> None:
        """The login form: a right token sets the session cookie."""
        if urlsplit(self.path).path != "/login":
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_FORM_BYTES:
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "text/plain", b"form too large")
            return
        form = parse_qs(self.rfile.read(length).decode(errors="replace"))
        token = form.get("token", [""])[0]
        next_path = form.get("next", ["/"])[0]
        if not next_path.startswith("/") or next_path.startswith("//"):
            next_path = "/"  # only paths of this server: no open redirect
        expected = self.web.settings.auth_token
        if expected and not hmac.compare_digest(token.encode(), expected.encode()):
            self._redirect(f"/login?failed=1&next={next_path}")
            return
        cookie = (f"{COOKIE}={session_value(expected)}; Path=/; HttpOnly; SameSite=Strict"
                  if expected else "")
        self._redirect(next_path, {"Set-Cookie": cookie} if cookie else {})

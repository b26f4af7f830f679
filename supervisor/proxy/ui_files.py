"""The status page's files (supervisor/proxy/ui/), shipped in the package: `GET /ui`.

Rules kept here:
- plain HTML, CSS and JavaScript, no build step and nothing fetched from elsewhere (the page must
  work on a machine without internet); the Content-Security-Policy says so to the browser too;
- the page holds no data: everything it shows it reads from /status and /events with the key the
  person types, so the files are served without a key, as /health is;
- only the files named in `FILES` are served; a file is read once, in a worker thread, then kept.
"""

from __future__ import annotations

from importlib import resources

import anyio.to_thread

from llama_smart_proxy.supervisor.proxy.http import Reply

PREFIX = b"/ui"
FILES = {
    "index.html": b"text/html; charset=utf-8",
    "ui.css": b"text/css; charset=utf-8",
    "ui.js": b"text/javascript; charset=utf-8",
}
HEADERS = [
    (b"cache-control", b"no-cache"),  # an upgraded proxy serves its new page at once
    (b"x-content-type-options", b"nosniff"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
]

_cache: dict[str, bytes] = {}


def file_name(path: bytes) -> str | None:
    """b'/ui', b'/ui/' -> 'index.html'; b'/ui/ui.js' -> 'ui.js'; None when not a file of the page."""
    if path in (PREFIX, PREFIX + b"/"):
        return "index.html"
    if not path.startswith(PREFIX + b"/"):
        return None
    name = path[len(PREFIX) + 1 :].decode("latin-1")
    return name if name in FILES else None


def _read(name: str) -> bytes:
    return resources.files("llama_smart_proxy.supervisor.proxy").joinpath("ui", name).read_bytes()


async def ui_reply(name: str) -> Reply:
    body = _cache.get(name)
    if body is None:
        body = _cache[name] = await anyio.to_thread.run_sync(_read, name)
    return Reply(200, body, content_type=FILES[name], headers=list(HEADERS))

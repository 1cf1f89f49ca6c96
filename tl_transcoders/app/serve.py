"""`tl-transcoders serve DIR`: a local viewer of the attribution graphs in DIR.

DIR is what `tl-transcoders attribute --out DIR` wrote (its `graph-files/` folder) or a
folder written by `export_graph` itself (holding `graph-metadata.json`). The server
listens on 127.0.0.1 only (by default) and serves one page per graph: the pruned graph
drawn with d3 (features at their layer and prompt position, edges by weight and sign),
a node's description on hover, and on click its strongest inputs and outputs and, for a
feature, its label and dashboard. Labels come from the graph file's `clerp` fields or a
labels file; dashboards from files written by `save_dashboards(..., "x.json")`.

    /                     the first graph's page (`/?slug=NAME` another graph's)
    /viewer.js, /viewer.css, /d3.min.js    the page's assets (package data)

`#node=ID` in the page's address selects a node, so a view can be shared as a link.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from tl_transcoders.analysis.dashboards import load_dashboards
from tl_transcoders.attribution.export import INDEX_FILE, read_index
from tl_transcoders.core.errors import TranscodersError
from tl_transcoders.core.files import read_mapping

__all__ = ["ASSETS", "ServeError", "make_server", "read_labels", "serve", "viewer_data", "viewer_page"]

ASSETS = {"viewer.js": "text/javascript", "viewer.css": "text/css", "d3.min.js": "text/javascript"}
"""The files of `tl_transcoders/app/viewer/` the page loads, and their content types."""


class ServeError(TranscodersError):
    """The directory, a labels file or a dashboards file cannot be served."""


def graph_directory(directory: str | os.PathLike) -> Path:
    """The folder holding the graph index: `directory` itself or its `graph-files/`."""
    directory = Path(directory)
    for candidate in (directory, directory / "graph-files"):
        if (candidate / INDEX_FILE).is_file():
            return candidate
    raise ServeError(
        f"{directory}: no {INDEX_FILE} here or in graph-files/; "
        "write one with `tl-transcoders attribute --out DIR` (or export_graph) and serve that DIR"
    )


def read_labels(path: str | os.PathLike) -> dict[tuple[int, int], str]:
    """Feature labels from a JSON object mapping `"LAYER/LATENT"` to a label."""
    try:
        raw = read_mapping(path, ServeError)
    except ServeError as err:
        raise ServeError(f'cannot read labels, a JSON object like {{"3/1021": "a label"}}: {err}') from None
    labels = {}
    for key, label in raw.items():
        match = re.fullmatch(r"(\d+)/(\d+)", str(key))
        if match is None or not isinstance(label, str):
            raise ServeError(f'{path}: entry {key!r}: keys are "LAYER/LATENT" and values are strings')
        labels[int(match[1]), int(match[2])] = label
    return labels


def viewer_data(
    directory: str | os.PathLike,
    slug: str | None = None,
    dashboards: Sequence[str | os.PathLike] = (),
    labels: dict[tuple[int, int], str] | None = None,
) -> dict:
    """What the page draws: `graph` (the graph file of `slug`, default the first listed,
    with `labels` set as feature labels), `dashboards` (`"LAYER_LATENT"` -> an HTML
    fragment, from the dashboards files) and `slugs` (every graph listed)."""
    folder = graph_directory(directory)
    try:
        index = read_index(folder / INDEX_FILE)
    except TranscodersError as err:
        raise ServeError(str(err)) from None
    slugs = [str(entry.get("slug")) for entry in index["graphs"]]
    if not slugs:
        raise ServeError(f"{folder / INDEX_FILE} lists no graph")
    slug = slugs[0] if slug is None else slug
    if slug not in slugs:
        raise ServeError(f"no graph {slug!r} in {folder}; it has {', '.join(slugs)}")
    try:
        graph = read_mapping(folder / f"{slug}.json", ServeError)
        nodes, links = graph["nodes"], graph["links"]
        tokens = graph["metadata"]["prompt_tokens"]
    except (ServeError, KeyError, TypeError) as err:
        raise ServeError(f"{folder / (slug + '.json')}: not a readable graph file ({err!r})") from None
    if not isinstance(nodes, list) or not isinstance(links, list) or not isinstance(tokens, list):
        raise ServeError(f"{folder / (slug + '.json')}: nodes, links and prompt tokens must be lists")
    for node in nodes:
        key = _feature_key(node)
        if key is not None and labels and key in labels:
            node["clerp"] = labels[key]
    fragments = {}
    for path in dashboards:
        for dashboard in load_dashboards(path):
            fragments[f"{dashboard.layer}_{dashboard.latent}"] = dashboard.to_html()
    return {"graph": graph, "dashboards": fragments, "slugs": slugs}


def _feature_key(node: dict) -> tuple[int, int] | None:
    """(layer, latent) of a feature node of a graph file, else None."""
    match = re.fullmatch(r"(\d+)_(\d+)_(\d+)", str(node.get("node_id", "")))
    return None if match is None else (int(match[1]), int(match[2]))


def viewer_page(data: dict) -> str:
    """The page of one graph: the template with `data` inlined (as JSON that cannot
    close its script element) and the title from the graph's prompt."""
    template = (resources.files("tl_transcoders.app.viewer") / "index.html").read_text(encoding="utf-8")
    metadata = data["graph"]["metadata"]
    title = f"Attribution graph: {metadata.get('slug', '')}"
    inlined = json.dumps(data).replace("<", "\\u003c")
    return template.replace("__TITLE__", html.escape(title)).replace("__DATA__", inlined)


class _Handler(BaseHTTPRequestHandler):
    """Serves the page of a graph and its assets; nothing else."""

    def __init__(self, *args, source: dict, **kwargs):
        self.source = source
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        url = urlparse(self.path)
        name = url.path.lstrip("/")
        if name in ASSETS:
            body = (resources.files("tl_transcoders.app.viewer") / name).read_bytes()
            return self._reply(HTTPStatus.OK, ASSETS[name], body)
        if name not in ("", "index.html"):
            return self._reply(HTTPStatus.NOT_FOUND, "text/plain", b"not found")
        slug = parse_qs(url.query).get("slug", [None])[0]
        try:
            page = viewer_page(viewer_data(slug=slug, **self.source))
        except TranscodersError as err:  # a graph, labels or dashboards file broken since the start
            return self._reply(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", str(err).encode())
        self._reply(HTTPStatus.OK, "text/html; charset=utf-8", page.encode())

    def _reply(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the standard library's name)
        pass  # quiet: the command prints its address once


def make_server(
    directory: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8765,
    dashboards: Sequence[str | os.PathLike] = (),
    labels: str | os.PathLike | None = None,
) -> ThreadingHTTPServer:
    """A server of the graphs in `directory` (not yet serving: call `serve_forever`),
    bound to `host`:`port` (port 0: any free port, see `server_address`). The directory,
    labels and dashboards are checked now, and read again on each page load, so a
    graph written later shows on reload."""
    source = {
        "directory": directory,
        "dashboards": list(dashboards),
        "labels": None if labels is None else read_labels(labels),
    }
    viewer_data(**source)  # refuse a bad directory or file before listening
    try:
        return ThreadingHTTPServer((host, port), partial(_Handler, source=source))
    except OSError as err:
        raise ServeError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None


def serve(directory: str | os.PathLike, **options: Any) -> None:
    """Serve the viewer until Ctrl-C, printing its address; `options` are
    `make_server`'s (`host`, `port`, `dashboards`, `labels`)."""
    server = make_server(directory, **options)
    address, bound = server.server_address[:2]
    print(f"serving the graphs of {directory} at http://{address}:{bound}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()

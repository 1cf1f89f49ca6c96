"""`tl-transcoders serve`: the viewer's data and server, and the page in a real browser
(headless Chromium driven over the DevTools protocol: real mouse events, the rendered DOM
read back)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import MODEL_PARAMS, attribute_command, build_model

from tl_transcoders.analysis.dashboards import collect_activations, latent_dashboards, save_dashboards
from tl_transcoders.app import cli
from tl_transcoders.app.serve import ServeError, make_server, viewer_data

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def attribute_directory(name: str, tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """`tl-transcoders attribute` on a tiny model into tmp_path/graph, a dashboards file
    of every latent of layer 0 and a labels file naming one feature of the pruned graph;
    returns the directory and the graph file."""
    model = build_model(name)
    monkeypatch.setattr(cli, "load_model", lambda name, device=None: model)
    out = tmp_path / "graph"
    transcoders, command, tokens = attribute_command(model, tmp_path, out)
    cli.main(command + ["--node-threshold", "0.95"])
    records = collect_activations(model, transcoders[0], tokens[None])
    alive = (records.fire_counts > 0).nonzero()[:, 0].tolist()
    save_dashboards(tmp_path / "dashboards.json", latent_dashboards(records, alive, model, transcoders[0]))
    graph = json.loads((out / "graph-files" / "graph.json").read_text())
    return out, graph


def feature_nodes(graph: dict, layer: int) -> list[dict]:
    return [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder" and n["layer"] == str(layer)]


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_viewer_data_is_the_exported_graph_with_labels_and_dashboards(name, monkeypatch, tmp_path, capsys):
    out, graph = attribute_directory(name, tmp_path, monkeypatch)
    feature = feature_nodes(graph, 0)[0]
    layer, latent = int(feature["layer"]), int(feature["node_id"].split("_")[1])
    (tmp_path / "labels.json").write_text(json.dumps({f"{layer}/{latent}": "a test label"}))
    from tl_transcoders.app.serve import read_labels

    data = viewer_data(out, dashboards=[tmp_path / "dashboards.json"], labels=read_labels(tmp_path / "labels.json"))
    assert data["slugs"] == ["graph"]
    assert [n["node_id"] for n in data["graph"]["nodes"]] == [n["node_id"] for n in graph["nodes"]]
    assert data["graph"]["links"] == graph["links"]
    labelled = {n["node_id"]: n["clerp"] for n in data["graph"]["nodes"] if n["clerp"] == "a test label"}
    assert set(labelled) == {n["node_id"] for n in feature_nodes(graph, 0) if n["node_id"].split("_")[1] == str(latent)}
    assert f"{layer}_{latent}" in data["dashboards"] and "tlt-dash-root" in data["dashboards"][f"{layer}_{latent}"]
    assert viewer_data(out / "graph-files")["graph"] == graph  # the graph folder itself serves too


def test_bad_directories_and_files_are_refused_by_name(monkeypatch, tmp_path, capsys):
    from tl_transcoders.app.serve import read_labels

    out, _ = attribute_directory(MODEL_PARAMS[0], tmp_path, monkeypatch)
    with pytest.raises(ServeError, match="tl-transcoders attribute --out DIR"):
        viewer_data(tmp_path / "nothing")
    with pytest.raises(ServeError, match="no graph 'other'.*graph"):
        viewer_data(out, slug="other")
    (tmp_path / "labels.json").write_text(json.dumps({"layer 3": "x"}))
    with pytest.raises(ServeError, match="LAYER/LATENT"):
        read_labels(tmp_path / "labels.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read dashboards"):
        viewer_data(out, dashboards=[tmp_path / "broken.json"])
    (out / "graph-files" / "graph.json").write_text("[]")
    with pytest.raises(ServeError, match="not a readable graph file"):
        viewer_data(out)
    with pytest.raises(SystemExit) as stop:
        cli.main(["serve", str(tmp_path / "nothing"), "--port", "0"])
    assert stop.value.code == 2 and "no graph-metadata.json" in capsys.readouterr().err


def serving(directory: Path, **options):
    """A started server on a free port, and its base URL."""
    server = make_server(directory, port=0, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_the_server_serves_the_page_and_its_assets_only(monkeypatch, tmp_path, capsys):
    out, graph = attribute_directory(MODEL_PARAMS[0], tmp_path, monkeypatch)
    server, url = serving(out)
    try:
        page = urllib.request.urlopen(f"{url}/").read().decode()
        assert '<script id="tlt-data" type="application/json">' in page and graph["links"][0]["source"] in page
        assert urllib.request.urlopen(f"{url}/d3.min.js").read().startswith(b"// https://d3js.org v7")
        for missing in ("/../pyproject.toml", "/graph-files/graph.json", "/?slug=other"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(url + missing)
            assert err.value.code == 404
        with pytest.raises(ServeError, match="pick another --port"):
            make_server(out, port=server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    # A dashboards file broken after the start: the page says so, the server keeps serving.
    server, url = serving(out, dashboards=[tmp_path / "dashboards.json"])
    try:
        (tmp_path / "dashboards.json").write_text("{")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/")
        assert err.value.code == 404 and "cannot read dashboards" in err.value.read().decode()
        assert urllib.request.urlopen(f"{url}/viewer.css").status == 200
    finally:
        server.shutdown()
        server.server_close()


class Browser:
    """Headless Chromium on one page, driven over the DevTools protocol."""

    def __init__(self, profile: Path):
        import websocket  # websocket-client, a test dependency

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000"]
            + ["--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in self.process.stderr:
            if "DevTools listening on " in line:
                browser_url = line.split("DevTools listening on ")[1].strip()
                break
        else:
            raise RuntimeError("Chromium did not start its DevTools server")
        port = browser_url.split(":")[2].split("/")[0]
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
        page = next(t for t in targets if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        while self.evaluate("document.body && document.body.dataset.ready") != "true":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not finish drawing: {self.evaluate('document.body.innerText')}")
            time.sleep(0.1)

    def mouse(self, kind: str, selector: str) -> None:
        """A real mouse event (`mouseMoved`, or a left click) at the centre of `selector`."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
            "e.scrollIntoView({block: 'center', inline: 'center'}); const r = e.getBoundingClientRect(); "
            "return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        events = ["mouseMoved"] if kind == "hover" else ["mouseMoved", "mousePressed", "mouseReleased"]
        for event in events:
            self.call("Input.dispatchMouseEvent", type=event, x=box[0], y=box[1], button="left", clickCount=1)

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (scripts/test.sh installs the Debian package)")
def test_the_page_in_a_browser_draws_the_graph_and_shows_a_dashboard_on_click(monkeypatch, tmp_path, capsys):
    out, graph = attribute_directory(MODEL_PARAMS[0], tmp_path, monkeypatch)
    feature = feature_nodes(graph, 0)[0]
    latent = int(feature["node_id"].split("_")[1])
    (tmp_path / "labels.json").write_text(json.dumps({f"0/{latent}": "a label from the labels file"}))
    server, url = serving(out, dashboards=[tmp_path / "dashboards.json"], labels=tmp_path / "labels.json")
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(f"{url}/")
        assert browser.evaluate("document.querySelectorAll('g.node').length") == len(graph["nodes"])
        assert browser.evaluate("document.querySelectorAll('line.link').length") == len(graph["links"])
        n_features = len([n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"])
        assert browser.evaluate("document.querySelectorAll('g.node.feature').length") == n_features
        selector = f'g.node[data-id="{feature["node_id"]}"]'
        browser.mouse("hover", selector)
        tooltip = browser.evaluate("document.getElementById('tooltip').innerText")
        assert f"layer 0 latent {latent}" in tooltip and "a label from the labels file" in tooltip
        assert browser.evaluate("document.getElementById('dashboard')") is None
        browser.mouse("click", selector)
        assert browser.evaluate("document.getElementById('node-label').innerText") == "a label from the labels file"
        assert browser.evaluate("document.querySelectorAll('#dashboard .tlt-dash-root').length") == 1
        assert browser.evaluate(f"document.querySelector('{selector}').classList.contains('selected')")
        inputs = browser.evaluate("[...document.querySelectorAll('#details ol')].length")
        assert inputs >= 1  # the feature's inputs (and outputs, where pruning kept some)
        # The address names the selected node: opening it again selects it.
        shared = browser.evaluate("location.href")
        assert shared.endswith(f"#node={feature['node_id']}")
        browser.open(f"{url}/?reload=1{shared[shared.index('#') :]}")
        assert browser.evaluate("document.querySelector('g.node.selected').dataset.id") == feature["node_id"]
    finally:
        browser.close()
        server.shutdown()
        server.server_close()


def test_serve_prints_its_address_and_stops_cleanly_on_ctrl_c(monkeypatch, tmp_path, capsys):
    import signal
    import sys

    out, graph = attribute_directory(MODEL_PARAMS[0], tmp_path, monkeypatch)
    command = [sys.executable, "-m", "tl_transcoders.app.cli", "serve", str(out), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving the graphs of {out} at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        assert graph["links"][0]["target"] in urllib.request.urlopen(url).read().decode()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and stdout.strip() == "stopped" and "Traceback" not in stderr

"""No web page can write to the sidecar (docs/operations.md, "Exposure"): headless Chromium opens a page
served from another origin whose script tries every state-changing route of a real sidecar without a token
(the default on loopback). Nothing changes; the project's own client, which sends no Origin, still ingests."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from tests.browser import Browser
from tests.conftest import need_binary

pytestmark = pytest.mark.integration

# Each attempt is what a page can do without a preflight (simple requests: text/plain, forms, no custom
# header; mode "no-cors" sends them and hides the answer), plus one JSON request that needs a preflight.
ATTACK = """
async function attack(sidecar) {
  const simple = (path, body, type) => fetch(sidecar + path, {method: "POST", mode: "no-cors", body: body,
      headers: type ? {"Content-Type": type} : {}}).then(() => "sent", (e) => "blocked: " + e);
  const nan = '{"run":"forged","rank":0,"time":' + Date.now() / 1000 + ',"step":1,"loss":NaN}';
  const out = {
    silence: await simple("/v1/silences", JSON.stringify({run: "victim", until: Date.now() / 1000 + 3600}),
                          "text/plain"),
    ingest: await simple("/v1/ingest", nan + "\\n" + nan.replace("step\\":1", "step\\":2"), "text/plain"),
    ingestForm: await simple("/v1/ingest", nan, "application/x-www-form-urlencoded"),
    reload: await simple("/-/reload", null, null),
    ack: await simple("/v1/alerts/1/ack", '{"by":"page"}', "text/plain"),
    redeliver: await simple("/v1/alerts/redeliver", null, null),
    json: await fetch(sidecar + "/v1/silences", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({run: "victim2", until: Date.now() / 1000 + 3600})}).then((r) => "answered " + r.status,
        (e) => "blocked: " + e),
  };
  const form = document.createElement("form");  // a form posts as a navigation, in a frame
  form.method = "POST"; form.enctype = "text/plain"; form.target = "sink";
  form.action = sidecar + "/v1/silences";
  const field = document.createElement("input");
  field.name = '{"run":"victim3","until":' + (Date.now() / 1000 + 3600) + ',"x":"'; field.value = '"}';
  form.appendChild(field); document.body.appendChild(form); form.submit();
  return out;
}
"""
PAGE = f"<!doctype html><title>elsewhere</title><iframe name=sink></iframe><script>{ATTACK}</script>"


@pytest.fixture
def elsewhere() -> Iterator[str]:
    """A page on another origin (another port of 127.0.0.1 is another origin)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_a_page_on_another_site_changes_nothing(start_sidecar, elsewhere: str, tmp_path: Path) -> None:
    browser = Browser(need_binary("chromium"), tmp_path / "chromium-profile")
    try:
        sidecar = start_sidecar(config="[detectors.nan_divergence]\n")
        browser.open(elsewhere)
        got = browser.eval(f"attack({json.dumps(sidecar.url)})")
        browser.pump(1.0)  # the form's navigation
    finally:
        browser.close()
    assert got["json"].startswith("blocked"), got  # the preflight is never granted
    assert sidecar.client.get("/v1/silences").json()["silences"] == []
    assert sidecar.client.get("/v1/runs").json()["runs"] == []
    assert sidecar.client.get("/v1/alerts").json()["alerts"] == []
    assert "config reloaded" not in sidecar.stderr_text()
    # the client's own way in: no Origin, NDJSON as text/plain
    answer = sidecar.client.post("/v1/ingest", content=b'{"run":"own","rank":0,"time":1700000000,"step":1}\n',
                                 headers={"Content-Type": "text/plain"})
    assert answer.status_code == 200 and answer.json()["accepted"] == 1
    refused = sidecar.client.post("/v1/silences", json={"run": "x", "until": time.time() + 3600},
                                  headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert refused.status_code == 403 and "another site" in refused.json()["error"], refused.text
    same = sidecar.client.post("/v1/silences", json={"run": "x", "until": time.time() + 3600},
                               headers={"Origin": sidecar.url, "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 201, same.text
    plain = sidecar.client.post("/v1/silences", content=b'{"run":"x","until":%d}' % (time.time() + 3600),
                                headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in plain.json()["error"], plain.text

"""No web page can read the sidecar by rebinding its name to the sidecar's address (docs/operations.md,
"Exposure"): a page on ``http://evil.example:PORT``, its name resolved to 127.0.0.1 as a rebinding attacker
makes it, is the sidecar's origin to the browser. Headless Chromium (``--host-resolver-rules``) opens it and
reads what it can; raw requests carry hostile Host headers; the names the sidecar is reached by still work."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from trainhealth.trainer.transport import HttpSender, classify

from tests.browser import Browser
from tests.conftest import need_binary

pytestmark = pytest.mark.integration

READ_ALL = """(async () => {
  const out = {};
  for (const path of ["/v1/runs", "/v1/alerts", "/metrics", "/", "/healthz"]) {
    const r = await fetch(path);
    out[path] = r.status + " " + (await r.text()).slice(0, 400);
  }
  return out;
})()"""
RECORD = b'{"run":"secret-run","rank":0,"time":1700000000,"step":1,"loss":1.5}\n'
ADVICE = "to reach it as 'evil.example', add that to server.allowed_hosts (--allowed-host evil.example, "


def read_as_evil(sidecar_url: str, tmp_path: Path, name: str) -> tuple[str, dict[str, str]]:
    """What a page on evil.example, resolved to 127.0.0.1, shows and reads of the sidecar."""
    port = sidecar_url.rsplit(":", 1)[1]
    browser = Browser(need_binary("chromium"), tmp_path / f"profile-{name}",
                      flags=("--host-resolver-rules=MAP evil.example 127.0.0.1",))
    try:
        browser.open(f"http://evil.example:{port}/")
        shown = browser.eval("document.body.innerText")
        return shown, browser.eval(READ_ALL)
    finally:
        browser.close()


def test_a_page_whose_name_is_rebound_to_the_sidecar_reads_nothing(start_sidecar, tmp_path: Path) -> None:
    sidecar = start_sidecar()
    assert sidecar.client.post("/v1/ingest", content=RECORD).json()["accepted"] == 1
    shown, read = read_as_evil(sidecar.url, tmp_path, "default")
    assert ADVICE in json.loads(shown)["error"], shown  # the page itself: the JSON error, not the live page
    for path, got in read.items():
        status, _, body = got.partition(" ")
        assert status == "421" and ADVICE in json.loads(body)["error"] and "secret-run" not in body, (path, got)
    # the same page with the check off reads everything: the attack is real, and this test would see it
    open_sidecar = start_sidecar("--allowed-host", "*")
    assert open_sidecar.client.post("/v1/ingest", content=RECORD).json()["accepted"] == 1
    _, read = read_as_evil(open_sidecar.url, tmp_path, "open")
    assert read["/v1/runs"].startswith("200 ") and "secret-run" in read["/v1/runs"], read
    assert read["/metrics"].startswith("200 ") and read["/"].startswith("200 "), read


def raw(url: str, host: bytes | None, request: bytes = b"GET /v1/runs HTTP/1.1\r\n",
        body: bytes = b"") -> tuple[int, bytes]:
    addr, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((addr, int(port)), timeout=10) as s:
        line = b"" if host is None else b"Host: " + host + b"\r\n"
        length = b"Content-Length: %d\r\n" % len(body) if body else b""
        s.sendall(request + line + length + b"Connection: close\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = re.match(rb"HTTP/1.[01] (\d+)", data)
    assert status, data[:200]
    return int(status.group(1)), data.partition(b"\r\n\r\n")[2]


ALLOWED = [b"127.0.0.1:%d", b"localhost:%d", b"LOCALHOST.", b"[::1]:%d", b"10.20.30.40:9464", b"[fe80::1]",
           socket.gethostname().encode()]
REFUSED = [b"evil.example:%d", b"evil.example", b"127.0.0.1.nip.io", b"localhost.evil.example", b"2130706433",
           b"0x7f.0.0.1", b"evil.example:80:90", b"", b"\xff\xfe", b"sidecar"]


def test_hostile_host_headers_get_a_421_naming_the_key_and_the_sidecars_names_pass(start_sidecar) -> None:
    sidecar = start_sidecar()
    port = int(sidecar.url.rsplit(":", 1)[1])
    for host in ALLOWED:
        value = host % port if b"%d" in host else host
        assert raw(sidecar.url, value)[0] == 200, value
    for host in REFUSED:
        value = host % port if b"%d" in host else host
        status, body = raw(sidecar.url, value)
        error = json.loads(body)["error"]
        assert status == 421 and "server.allowed_hosts" in error and "DNS rebinding" in error, (value, body)
    assert raw(sidecar.url, None, b"GET /v1/runs HTTP/1.0\r\n")[0] == 200  # no Host: not a browser
    # a write by a refused name changes nothing
    status, _ = raw(sidecar.url, b"evil.example", b"POST /v1/ingest HTTP/1.1\r\n", RECORD)
    assert status == 421 and sidecar.client.get("/v1/runs").json()["runs"] == []
    assert raw(sidecar.url, b"evil.example", b"GET /metrics HTTP/1.1\r\n")[0] == 421
    assert raw(sidecar.url, b"evil.example", b"GET /healthz HTTP/1.1\r\n")[0] == 421
    # the project's client, by name: localhost
    sender = HttpSender(f"http://localhost:{port}")
    assert sender.send([{"run": "by-name", "rank": 0, "time": 1700000000.0, "step": 1}]).outcome == "ok"
    sender.close()
    # a 421 is configuration: the client keeps the records and retries, and its log line names the key
    status, body = raw(sidecar.url, b"sidecar:9464", b"POST /v1/ingest HTTP/1.1\r\n", RECORD)
    result = classify(status, body.decode())
    assert result.outcome == "retry" and "server.allowed_hosts (--allowed-host sidecar," in result.reason, result


def test_allowed_hosts_from_the_file_the_environment_and_the_flag(start_sidecar) -> None:
    listed = start_sidecar(config='[server]\nallowed_hosts = ["sidecar", "*.corp.example"]\n')
    for host, status in ((b"sidecar:9464", 200), (b"a.corp.example", 200), (b"b.a.corp.example:1", 200),
                         (b"corp.example", 421), (b"evilcorp.example", 421), (b"localhost", 200)):
        assert raw(listed.url, host)[0] == status, host
    env = start_sidecar(env={"TRAINHEALTH_ALLOWED_HOSTS": "trainhealth.monitoring.svc,sidecar"})
    assert raw(env.url, b"trainhealth.monitoring.svc:9464")[0] == 200
    assert raw(env.url, b"evil.example")[0] == 421
    off = start_sidecar("--allowed-host", "*")
    assert raw(off.url, b"evil.example")[0] == 200

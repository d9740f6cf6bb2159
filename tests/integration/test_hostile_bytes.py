"""Any bytes in any field of the real sidecar's API: a 400 or a per-record rejection naming the field,
never a 500, and the rest of a batch is taken. Raw sockets, so the bytes go out exactly as written."""

from __future__ import annotations

import json
import re
import socket

import pytest

pytestmark = pytest.mark.integration

HOSTILE = {"invalid": b"\xff\xfe", "overlong": b"\xc0\xaf", "cesu-surrogate": b"\xed\xa0\x80",
           "cut-multibyte": b"ab\xe2\x82", "escaped-surrogate": b"\\ud800"}


def send(url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + (b"Content-Length: %d\r\n" % len(body) if body else b"")
                  + b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = re.match(rb"HTTP/1.1 (\d+)", data)
    assert status, data[:200]
    return int(status.group(1)), data.partition(b"\r\n\r\n")[2]


def record(run: bytes, **extra: bytes) -> bytes:
    fields = b"".join(b',"%s":"%s"' % (k.encode(), v) for k, v in extra.items())
    return b'{"run":"%s","rank":0,"time":1700000000,"step":1%s}' % (run, fields)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_bytes_in_a_record_reject_that_record_by_field(sidecar, name: str) -> None:
    bad = HOSTILE[name]
    cases = [
        (b"application/json", b"[" + record(bad) + b"," + record(b"good") + b"]", "run", 1),
        (b"application/json", record(bad), "run", 0),
        (b"application/x-ndjson", record(bad) + b"\n" + record(b"good") + b"\n", "run", 1),
        (b"application/json", b"[" + record(b"good", host=bad) + b"]", "host", 0),
        (b"application/json", b'[{"run":"good","rank":0,"time":1700000000,"step":1,"metrics":{"'
         + bad + b'":1}}]', "metrics", 0),
    ]
    for content_type, body, field, accepted in cases:
        status, answer = send(sidecar.url, b"POST /v1/ingest HTTP/1.1\r\nContent-Type: " + content_type + b"\r\n",
                              body)
        assert status == (200 if accepted else 400), answer
        got = json.loads(answer)
        assert got["accepted"] == accepted
        (error,) = got["errors"]
        assert error["field"] == field and "not valid UTF-8" in error["reason"], error


@pytest.mark.parametrize("name", ["invalid", "overlong", "cesu-surrogate", "cut-multibyte"])
def test_hostile_bytes_in_paths_queries_headers_and_small_bodies_get_a_400_naming_them(sidecar, name: str) -> None:
    bad = HOSTILE[name]
    escaped = b"".join(b"%%%02X" % b for b in bad)
    status, answer = send(sidecar.url, b"GET /v1/runs/" + escaped + b" HTTP/1.1\r\n")
    assert status == 400 and json.loads(answer)["error"].startswith("path: not valid UTF-8"), answer
    status, answer = send(sidecar.url, b"GET /v1/alerts?run=" + escaped + b" HTTP/1.1\r\n")
    assert status == 400 and json.loads(answer)["error"].startswith("query parameter 'run'"), answer
    status, _ = send(sidecar.url, b"GET /v1/runs/" + bad + b" HTTP/1.1\r\n")  # raw, unescaped
    assert status == 400
    status, _ = send(sidecar.url, b"GET /v1/runs HTTP/1.1\r\nAuthorization: Bearer " + bad
                     + b"\r\nContent-Type: " + bad + b"\r\nX-Anything: " + bad + b"\r\n")
    assert status == 200  # header values are bytes to the app; nothing here reads them as text
    status, answer = send(sidecar.url, b"POST /v1/ingest HTTP/1.1\r\nContent-Type: " + bad + b"\r\n",
                          record(b"good"))
    assert status == 415, answer
    status, answer = send(sidecar.url, b"POST /v1/silences HTTP/1.1\r\nContent-Type: application/json\r\n",
                          b'{"run":"good","until":9999999999,"comment":"' + bad + b'"}')
    assert status == 400 and "body.comment: not valid UTF-8" in json.loads(answer)["error"], answer
    status, answer = send(sidecar.url, b"POST /v1/alerts/1/ack HTTP/1.1\r\nContent-Type: application/json\r\n",
                          b'{"by":"' + bad + b'"}')
    assert status == 400 and "body.by: not valid UTF-8" in json.loads(answer)["error"], answer
    assert sidecar.client.get("/healthz").status_code == 200

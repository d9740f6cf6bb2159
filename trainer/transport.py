"""Where batches of records go: the sidecar over HTTP, or a .jsonl file (offline mode).

Both senders take a list of plain dicts and answer with a ``Result``; they never
raise. Encoding uses Python's ``json``, which writes NaN and Infinity as the
bare tokens ``NaN``/``Infinity`` that the sidecar reads. Do not swap in orjson
or msgspec here: they encode NaN as ``null``, and a NaN loss that arrives as
"not measured" is the worst bug this project can have.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Literal
from urllib.parse import quote, urlsplit

Outcome = Literal["ok", "retry", "drop", "split"]
MAX_ANSWER_BYTES = 1 << 20  # an ingest answer is read whole up to this; a longer one closes the connection
BATCH_HEADER = "X-Trainhealth-Batch"  # CLIENT/SEQ: a resend carries the same id, the sidecar takes it once
VIEWS_HEADER = "X-Trainhealth-Views"  # "1": the answer carries the runs' alerts and stop steps
LAUNCH_HEADER = "X-Trainhealth-Launch"  # who sends: id=LAUNCH; pid=PID; host=HOST; job=JOB (docs/record.md)


@dataclass(slots=True)
class Result:
    outcome: Outcome  # ok: delivered; retry: try again later; drop: never deliverable; split: too big
    reason: str = ""
    retry_after: float | None = None  # seconds, from a Retry-After header
    answer: dict[str, Any] | None = None  # the sidecar's JSON answer to a delivered batch


def encode_json(records: list[dict[str, Any]]) -> bytes:
    """A JSON array; NaN/Infinity stay bare tokens; unknown objects become strings."""
    return json.dumps(records, separators=(",", ":"), allow_nan=True, default=str).encode()


def encode_jsonl(records: list[dict[str, Any]]) -> bytes:
    """One record per line, the format ``trainhealth replay`` reads."""
    lines = [json.dumps(r, separators=(",", ":"), allow_nan=True, default=str) for r in records]
    return ("\n".join(lines) + "\n").encode()


class _Connection:
    """One keep-alive http.client connection to the sidecar (http.client is the cheapest client in the
    training process, see docs/measured.md)."""

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url: must be http(s)://host[:port][/prefix], got {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self.prefix = parts.path.rstrip("/")
        # what an error names: the address tried, without any user:password part (the token is a header)
        netloc = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.shown = f"{parts.scheme}://{netloc}{'' if parts.port is None else f':{parts.port}'}{self.prefix}"
        self._timeout = timeout
        self._headers = {"Connection": "keep-alive"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._conn: http.client.HTTPConnection | None = None
        self.aborted = False  # abort(): no request any more

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        if self._conn is not None:
            return self._conn, True
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        self._conn = cls(self._host, self._port, timeout=self._timeout)
        return self._conn, False

    def exchange(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes, str | None] | str:
        """(status, the whole answer, Retry-After), or why not (a string). The answer is read whole (up to
        MAX_ANSWER_BYTES) before anything else is sent on the connection: unread bytes would be taken
        for the next answer."""
        for _ in range(2):  # the server may have closed a reused keep-alive connection: one fresh retry
            if self.aborted:
                return "aborted"
            conn, reused = self._connection()
            try:
                conn.request(method, self.prefix + path, body=body, headers={**self._headers, **(headers or {})})
                resp = conn.getresponse()
                text = resp.read(MAX_ANSWER_BYTES + 1)
                if resp.will_close or len(text) > MAX_ANSWER_BYTES or not resp.isclosed():
                    self.close()  # not all of it read: this connection cannot carry another request
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if reused and not isinstance(exc, TimeoutError):
                    continue
                return f"{type(exc).__name__}: {exc} ({method} {self.shown}{path})"
            return resp.status, text[:MAX_ANSWER_BYTES], resp.getheader("Retry-After")
        return "connection closed twice"  # pragma: no cover - loop always returns

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:  # pragma: no cover - closing a broken socket
                pass
            self._conn = None


class HttpSender(_Connection):
    """POSTs batches to ``{url}/v1/ingest`` on one keep-alive connection; each batch carries its id and,
    with ``launch`` (a callable: the pid may change at a fork), the sender's launch identity."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0,
                 launch: Callable[[], str] | None = None) -> None:
        super().__init__(url, token, timeout)
        self.path = self.prefix + "/v1/ingest"
        self.launch = launch

    def send(self, records: list[dict[str, Any]], batch_id: str | None = None) -> Result:
        headers = {"Content-Type": "application/json", VIEWS_HEADER: "1"}
        if self.launch is not None:
            headers[LAUNCH_HEADER] = self.launch()
        if batch_id is not None:
            headers[BATCH_HEADER] = batch_id
        got = self.exchange("POST", "/v1/ingest", encode_json(records), headers)
        if isinstance(got, str):
            return Result("retry", got)
        status, text, retry_after = got
        result = classify(status, text.decode("utf-8", "replace"), retry_after)
        if result.outcome == "ok":
            result.answer = _json_object(text)
        return result


class ViewPoller(_Connection):
    """The long poll of a run's view (``GET /v1/runs/{run}/watch``): firing alerts and stop steps."""

    def __init__(self, url: str, run: str, token: str | None = None, wait: float = 25.0,
                 launch: Callable[[], str] | None = None) -> None:
        super().__init__(url, token, wait + 10.0)
        self.wait = wait
        self.path = f"/v1/runs/{quote(run, safe='')}/watch"
        self.launch = launch  # who asks: a client of another job than the run's hears nothing

    def abort(self) -> None:
        """From another thread: end a long poll in progress (close() alone does not wake a blocked read)."""
        self.aborted = True
        conn = self._conn
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def poll(self, version: int) -> dict[str, Any] | str:
        """The run's view once its version is not ``version`` (or after the wait); or why not (a string)."""
        headers = {LAUNCH_HEADER: self.launch()} if self.launch is not None else None
        got = self.exchange("GET", f"{self.path}?version={version}&timeout={self.wait:g}", headers=headers)
        if isinstance(got, str):
            return got
        status, text, _ = got
        view = _json_object(text) if status == 200 else None
        if view is None:
            return f"HTTP {status}: {text[:200].decode('utf-8', 'replace')}"
        return view


def _json_object(text: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def classify(status: int, text: str, retry_after: str | None = None) -> Result:
    """2xx delivered; 413 split the batch; 5xx, 408, 429, auth errors and 421 (a Host name the sidecar is
    not configured for) retried, after Retry-After when given (the sidecar may come back or be
    reconfigured); any other 4xx means these records will never be accepted: dropped."""
    reason = f"HTTP {status}: {text[:200]}"
    if 200 <= status < 300:
        return Result("ok")
    if status == 413:
        return Result("split", reason)
    if status >= 500 or status in (401, 403, 408, 421, 429):
        after = None
        if retry_after:
            try:
                after = min(float(retry_after), 300.0)
            except ValueError:
                after = None
        return Result("retry", reason, after)
    return Result("drop", reason)


class FileSender:
    """Appends batches to a .jsonl file. Each batch is one ``os.write`` on an O_APPEND descriptor,
    so several ranks may share one file without interleaving lines (local filesystems)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def send(self, records: list[dict[str, Any]], batch_id: str | None = None) -> Result:
        try:
            if self._fd is None:
                parent = os.path.dirname(self.path)
                if parent:
                    os.makedirs(parent, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            data = encode_jsonl(records)
            written = os.write(self._fd, data)
            while written < len(data):  # pragma: no cover - short writes only on odd filesystems
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            return Result("retry", f"{self.path}: {exc}")
        return Result("ok")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

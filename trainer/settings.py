"""The client's settings, and the one place that reads the environment.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``TORCHELASTIC_RUN_ID``; trainhealth's own
variables are ``TRAINHEALTH_URL``, ``TRAINHEALTH_RUN`` (overrides the run name),
``TRAINHEALTH_TOKEN``, ``TRAINHEALTH_OFFLINE`` (write a .jsonl instead of sending),
``TRAINHEALTH_HEARTBEAT_SECONDS``, ``TRAINHEALTH_FLUSH_SECONDS``, ``TRAINHEALTH_SAMPLE_SECONDS``
(host PSS and NVML) and ``TRAINHEALTH_NODE`` (the host name the start record carries; default the
machine's, so one machine can stand for two in a test).

The launch identity every batch carries (``X-Trainhealth-Launch``, docs/record.md): ``launch_id``, made once
per process (``TRAINHEALTH_LAUNCH_ID`` when trainhealth.launch started the process: the launcher and its
rank share it), and ``job``: ``TRAINHEALTH_JOB``, else torchrun's rendezvous id ``TORCHELASTIC_RUN_ID``
(kept across restarts; not "none", the id of every static rendezvous), else the rendezvous address every
rank of one torch.distributed job shares (``MASTER_ADDR:MASTER_PORT``; a loopback address is prefixed
with the machine's name), else the launch id for a job of one process, else "-" (not known).

One sidecar per job: ``TRAINHEALTH_URL=http://{master}:9464`` sends every rank to the sidecar on the
rendezvous host; ``{master}`` is ``MASTER_ADDR``, which torchrun (and the PyTorchJob operator, and a Slurm
script that sets it) gives every rank. Without ``MASTER_ADDR`` it is 127.0.0.1, with a warning.

``TRAINHEALTH_HOST`` is the sidecar's bind address. The client took it as its host name before
``TRAINHEALTH_NODE`` existed: it still does when ``TRAINHEALTH_NODE`` is unset, with a deprecation
warning, except for an IP address (0.0.0.0, a node's address: a bind address from a shared environment
file), which is not a host name and is ignored, with a warning.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from dataclasses import dataclass, fields
from typing import Any, Mapping

log = logging.getLogger("trainhealth.trainer")

DEFAULT_URL = "http://127.0.0.1:9464"
RUN_RE = re.compile(r"\A(?!\.+\Z)[A-Za-z0-9._:-]{1,128}\Z")  # not only dots: the sidecar refuses those
_RUN_BAD_CHARS = re.compile(r"[^A-Za-z0-9._:-]")
_JOB_BAD_CHARS = re.compile(r"[^A-Za-z0-9._:/-]")  # X-Trainhealth-Launch's values
LAUNCH_ID = os.urandom(8).hex()  # this process's launch id (a forked child inherits it, and does not send)
LOOPBACK = ("127.", "localhost", "::1", "0.0.0.0")


@dataclass(kw_only=True, slots=True)
class ClientSettings:
    url: str = DEFAULT_URL
    run: str = "local"
    rank: int = 0
    world_size: int = 1
    token: str | None = None
    offline_path: str | None = None  # may contain {rank} and {run}
    capacity: int = 10_000  # records buffered at most; beyond, the oldest are dropped
    batch_records: int = 500  # records per POST at most; a full batch is sent at once
    flush_seconds: float = 1.0  # otherwise send what is there this often
    heartbeat_seconds: float = 5.0
    timeout_seconds: float = 5.0  # per HTTP request
    backoff_seconds: float = 0.5  # first retry delay after a failed send; doubles
    max_backoff_seconds: float = 10.0
    sample_seconds: float = 5.0  # host PSS and NVML are read this often (background thread)
    host: str = ""  # the start record's host (groups ranks by machine); "" = socket.gethostname()
    poll_seconds: float = 0.005  # while device values are on their way, look for finished copies this often
    crash_flush_seconds: float = 2.0  # a crash's end record: how long the dying process waits for it to leave
    stop_confirm_seconds: float = 60.0  # should_stop at the stop step: how long it waits for every rank's ack
    report_sigterm: bool = True  # a SIGTERM that would kill the process silently sends an end first (sigterm.py)
    launch_id: str = LAUNCH_ID  # this process's launch (X-Trainhealth-Launch)
    job: str = ""  # the job its ranks share ("" or "-": not known)

    def __post_init__(self) -> None:
        if not RUN_RE.match(self.run):
            raise ValueError(f"run: must be 1-128 chars of [A-Za-z0-9._:-], not only dots, got {self.run!r}")
        if self.rank < 0:
            raise ValueError(f"rank: must be >= 0, got {self.rank}")
        if self.world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {self.world_size}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url: must start with http:// or https://, got {self.url!r}")
        if not isinstance(self.report_sigterm, bool):
            raise ValueError(f"report_sigterm: must be True or False, got {self.report_sigterm!r}")
        for name in ("capacity", "batch_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("flush_seconds", "heartbeat_seconds", "timeout_seconds", "backoff_seconds",
                     "max_backoff_seconds", "sample_seconds", "poll_seconds", "crash_flush_seconds",
                     "stop_confirm_seconds"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name}: must be > 0, got {value!r}")


def sanitize_run(name: str) -> str:
    """A run name the sidecar accepts: invalid characters become '-', at most 128 chars."""
    name = _RUN_BAD_CHARS.sub("-", name)[:128]
    return name if name.strip(".") else "local"  # "", ".", "..": not a run name


def job_of(env: Mapping[str, str], host: str, launch_id: str, world_size: int | None = None) -> str:
    """The job key its ranks share: TRAINHEALTH_JOB, else torchrun's rendezvous id (unless "none": a
    static rendezvous), else MASTER_ADDR:MASTER_PORT (the rendezvous of a torch.distributed job; a loopback
    address is the machine's own: ``host`` is its name), else the launch id for a job of one process
    (``world_size``, as the client was given it: by torchrun's WORLD_SIZE or by the caller), else "-" (not
    known: ranks started some other way share no key the sidecar could judge)."""
    job = env.get("TRAINHEALTH_JOB")
    rdzv = env.get("TORCHELASTIC_RUN_ID", "")
    if not job and rdzv and rdzv != "none":
        job = f"rdzv:{rdzv}"  # torchrun's rendezvous id: one per job, kept across restarts and resizes
    if not job:
        addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
        if addr and port:
            job = f"{host}/{addr}:{port}" if addr.startswith(LOOPBACK) else f"{addr}:{port}"
        elif (world_size if world_size is not None else _env_int(env, "WORLD_SIZE", 1)) <= 1:
            job = launch_id  # a job of one process
        else:
            job = "-"  # ranks started some other way: the job is not known (the sidecar does not judge it)
    return _JOB_BAD_CHARS.sub("-", job)[:160]


def launch_header(s: ClientSettings, pid: int) -> str:
    """``X-Trainhealth-Launch``: ``id=ID; pid=PID; host=HOST; job=JOB`` (docs/record.md)."""
    host = _RUN_BAD_CHARS.sub("-", s.host)[:128] or "-"
    return f"id={s.launch_id}; pid={pid}; host={host}; job={s.job or '-'}"


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        log.warning("trainhealth: ignoring %s=%r (not an integer); using %d", name, raw, default)
        return default


def _env_float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        log.warning("trainhealth: ignoring %s=%r (not a positive number); using %g", name, raw, default)
        return default
    return value


MASTER = "{master}"  # in TRAINHEALTH_URL: the rendezvous host (MASTER_ADDR), for one sidecar per job


def sidecar_url(environ: Mapping[str, str]) -> str:
    """TRAINHEALTH_URL with ``{master}`` replaced by MASTER_ADDR (an IPv6 address in brackets)."""
    url = (environ.get("TRAINHEALTH_URL") or DEFAULT_URL).strip()
    if MASTER not in url:
        return url
    master = (environ.get("MASTER_ADDR") or "").strip()
    if not master:
        log.warning("trainhealth: TRAINHEALTH_URL=%s names {master} but MASTER_ADDR is not set (not under "
                    "torchrun?); using 127.0.0.1", url)
        master = "127.0.0.1"
    elif ":" in master and not master.startswith("["):
        master = f"[{master}]"
    return url.replace(MASTER, master)


def node_name(environ: Mapping[str, str]) -> str:
    """The host name this rank reports: TRAINHEALTH_NODE, else (deprecated) a host name in TRAINHEALTH_HOST,
    else the machine's."""
    node = (environ.get("TRAINHEALTH_NODE") or "").strip()
    if node:
        return node
    old = (environ.get("TRAINHEALTH_HOST") or "").strip()
    if old:
        try:
            ipaddress.ip_address(old)
        except ValueError:
            log.warning("trainhealth: TRAINHEALTH_HOST=%s as the client's host name is deprecated: set "
                        "TRAINHEALTH_NODE (TRAINHEALTH_HOST is the sidecar's bind address)", old)
            return old
        log.warning("trainhealth: ignoring TRAINHEALTH_HOST=%s for the host name (an address: the sidecar's "
                    "bind address); set TRAINHEALTH_NODE to name this node", old)
    return socket.gethostname()


def from_environ(environ: Mapping[str, str] | None = None, **overrides: Any) -> ClientSettings:
    """Settings from the environment; explicit arguments (not None) win."""
    env = os.environ if environ is None else environ
    run = (env.get("TRAINHEALTH_RUN") or env.get("TORCHELASTIC_RUN_ID")
           or f"{socket.gethostname()}-{os.getpid()}")
    values: dict[str, Any] = {
        "url": sidecar_url(env).rstrip("/") if overrides.get("url") is None else overrides["url"],
        "run": sanitize_run(run),
        "rank": _env_int(env, "RANK", 0),
        "world_size": _env_int(env, "WORLD_SIZE", 1),
        "token": env.get("TRAINHEALTH_TOKEN") or None,
        "offline_path": env.get("TRAINHEALTH_OFFLINE") or None,
        "heartbeat_seconds": _env_float(env, "TRAINHEALTH_HEARTBEAT_SECONDS", 5.0),
        "flush_seconds": _env_float(env, "TRAINHEALTH_FLUSH_SECONDS", 1.0),
        "sample_seconds": _env_float(env, "TRAINHEALTH_SAMPLE_SECONDS", 5.0),
        "host": node_name(env) if overrides.get("host") is None else overrides["host"],
    }
    values["launch_id"] = sanitize_run(env.get("TRAINHEALTH_LAUNCH_ID") or LAUNCH_ID)[:64]
    known = {f.name for f in fields(ClientSettings)}
    for key, value in overrides.items():
        if key not in known:
            raise TypeError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = value
    if overrides.get("job") is None:  # the machine's name (not TRAINHEALTH_HOST); the world size as given
        values["job"] = job_of(env, socket.gethostname(), values["launch_id"], values["world_size"])
    if isinstance(values["url"], str):
        values["url"] = values["url"].rstrip("/")
    return ClientSettings(**values)

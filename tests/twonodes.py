"""Two nodes on one machine: network namespaces on a bridge, each node with its own host name.

    with TwoNodes() as bed:                      # root only; everything it made is removed at exit
        sidecar = bed.popen(0, [python, "-m", "trainhealth", "serve", "--host", bed.addr(0), ...])
        bed.torchrun(node, [...])                # torchrun --nnodes 2, c10d rendezvous on node 0, gloo
        bed.node_down(1)                         # its link down, then every process in it SIGKILLed

Each node is a network namespace (``th-mn<pid>-<i>``) with a veth to a bridge (``th-mn<pid>b``) in the
namespace this process runs in, which holds an address on the same /24: the observer (the test, Prometheus,
Alertmanager) reaches every node the way a monitoring host reaches a cluster. Each node's processes run in
a UTS namespace of their own with the node's host name (``node-0``, ``node-1``), and
``/etc/netns/<namespace>/hosts`` names both nodes (``ip netns exec`` mounts it over /etc/hosts), so
``socket.gethostname()`` and name lookups answer as on two machines. gloo runs over the veth
(``GLOO_SOCKET_IFNAME``).

A node down is its link going down first (the peer's packets are lost: its ranks wait in their collective,
as when a real machine dies; no FIN or RST reaches them) and then every process of the namespace killed
(``ip netns pids``).

The user's script: ``scripts/two-nodes`` (``python -m tests.twonodes --help``).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ("node-0", "node-1")
NETNS_ETC = Path("/etc/netns")


class BedUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, no unshare): the reason."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def why_unavailable() -> str | None:
    """Why the bed cannot be built on this machine, or None."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "the two-node bed needs root (ip netns add)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"the two-node bed needs `{tool}` (iproute2, util-linux)"
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200-249.x.0 that no route here uses (this namespace holds the bridge's address)."""
    routes = _ip("-4", "route", "show", "table", "all").stdout
    used = [ipaddress.IPv4Network(m, strict=False) for m in re.findall(r"\b(\d+\.\d+\.\d+\.\d+/\d+)", routes)]
    used += [ipaddress.IPv4Network(f"{m}/32") for m in re.findall(r"^(?:local |broadcast )?(\d+\.\d+\.\d+\.\d+)\s",
                                                                   routes, flags=re.M)]
    seed = os.getpid()
    for i in range(2000):
        n = (seed + i * 7919) % (50 * 256)
        net = ipaddress.IPv4Network(f"10.{200 + n // 256}.{n % 256}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):  # (the default route overlaps all)
            return net
    raise BedUnavailable("no free 10.200-249.x.0/24 subnet for the bed")


class TwoNodes:
    """The bed: two namespaces on a bridge. ``close()`` (or leaving the ``with``) removes all of it."""

    def __init__(self, tag: str | None = None) -> None:
        reason = why_unavailable()
        if reason:
            raise BedUnavailable(reason)
        tag = tag or str(os.getpid())
        self.tag = tag
        self.bridge = f"th-mn{tag}b"[:15]
        self.namespaces = [f"th-mn{tag}-{i}" for i in range(2)]
        self.veths = [(f"th-mn{tag}h{i}"[:15], f"th-mn{tag}n{i}"[:15]) for i in range(2)]  # (host end, node end)
        self.hosts = HOSTS
        self.procs: list[subprocess.Popen[Any]] = []
        net = _free_subnet()
        self.prefix = net.prefixlen
        hosts = list(net.hosts())
        self.addrs = [str(hosts[0]), str(hosts[1])]  # node-0, node-1
        self.observer = str(hosts[-1])  # the bridge: where the test, Prometheus and Alertmanager stand
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- building and removing ----------------------------------------------------------------------
    def _build(self) -> None:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
        except subprocess.CalledProcessError as err:
            raise BedUnavailable(f"cannot make a bridge: {err.stderr.strip()}") from err
        _ip("addr", "add", f"{self.observer}/{self.prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts_file = "".join(f"{a} {h}\n" for a, h in zip(self.addrs, self.hosts))
        hosts_file = f"127.0.0.1 localhost\n{hosts_file}{self.observer} observer\n"
        for i, ns in enumerate(self.namespaces):
            try:
                _ip("netns", "add", ns)
            except subprocess.CalledProcessError as err:
                raise BedUnavailable(f"cannot make a network namespace: {err.stderr.strip()}") from err
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)
            outer, inner = self.veths[i]
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{self.addrs[i]}/{self.prefix}", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Kill every process of both nodes and remove the namespaces, veths, bridge and hosts files."""
        for ns in self.namespaces:
            self._kill_all(ns)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process in D state
                pass
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        for outer, _ in self.veths:
            _ip("link", "del", outer, check=False)  # gone with its namespace's end already, normally
        _ip("link", "del", self.bridge, check=False)
        try:
            NETNS_ETC.rmdir()  # only when empty: another bed's files stay
        except OSError:
            pass

    def __enter__(self) -> TwoNodes:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- running things on a node --------------------------------------------------------------------
    def addr(self, node: int) -> str:
        return self.addrs[node]

    def interface(self, node: int) -> str:
        """The node's own network interface (its veth end): GLOO_SOCKET_IFNAME."""
        return self.veths[node][1]

    def command(self, node: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run on ``node``: in its network namespace, in a UTS namespace with its host name."""
        return ["ip", "netns", "exec", self.namespaces[node], "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.hosts[node], *argv]

    def popen(self, node: int, argv: Sequence[str], env: dict[str, str] | None = None,
              log: Path | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on ``node`` (output to ``log``, else inherited); it is killed at ``close()``."""
        out = open(log, "w") if log is not None else None
        try:
            proc = subprocess.Popen(self.command(node, argv), env=env, cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT if out is not None else None, **kwargs)
        finally:
            if out is not None:
                out.close()
        self.procs.append(proc)
        return proc

    def torchrun(self, node: int, port: int, args: Sequence[str], env: dict[str, str], log: Path | None = None,
                 nproc: int = 2) -> subprocess.Popen[Any]:
        """This node's torchrun agent: ``--nnodes 2``, a c10d rendezvous at node 0's address, gloo on the
        node's veth. ``args``: the module and its arguments (``-m trainhealth.trainer ...``)."""
        env = {**env, "GLOO_SOCKET_IFNAME": self.interface(node), "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(nproc),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{self.addrs[0]}:{port}",
                "--rdzv_id", env.get("TRAINHEALTH_RUN", "bed"), "--local_addr", self.addrs[node],
                "--max_restarts", "0", *args]
        return self.popen(node, argv, env=env, log=log)

    def pids(self, node: int) -> list[int]:
        """Every process in the node's network namespace."""
        out = _ip("netns", "pids", self.namespaces[node], check=False).stdout
        return [int(p) for p in out.split()]

    def _kill_all(self, ns: str) -> None:
        for _ in range(20):  # a process may fork while we kill: until none is left
            pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def link_down(self, node: int) -> None:
        """Cut the node's cable: both ends of its veth down."""
        outer, inner = self.veths[node]
        _ip("-n", self.namespaces[node], "link", "set", inner, "down")
        _ip("link", "set", outer, "down")

    def link_up(self, node: int) -> None:
        """Plug the cable back in (the node's processes stay dead: start new ones)."""
        outer, inner = self.veths[node]
        _ip("-n", self.namespaces[node], "link", "set", inner, "up")
        _ip("link", "set", outer, "up")

    def node_down(self, node: int) -> float:
        """The node dies: its link down, then every process in it SIGKILLed. Returns the wall time of the cut."""
        at = time.time()
        self.link_down(node)
        self._kill_all(self.namespaces[node])
        for proc in self.procs:
            proc.poll()  # reap ours among them
        return at


# -- the user's script -------------------------------------------------------------------------------------

def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/two-nodes",
        description="Two nodes in network namespaces (root only): a 2x2-rank torchrun job of the reference "
                    "trainer, per job (one sidecar on node-0) or per node (one sidecar on each node); "
                    "optionally node-1 goes down. Prints the alerts; everything is removed at exit.")
    p.add_argument("--topology", choices=("job", "node"), default="job")
    p.add_argument("--down-after", type=float, default=10.0, metavar="S",
                   help="node-1 goes down S seconds after every rank trains (0: never)")
    p.add_argument("--watch", type=float, default=20.0, metavar="S", help="seconds to watch after that")
    p.add_argument("trainer_args", nargs="*", help="arguments for the trainer (after --), e.g. -- --inject "
                                                  "nan-data --inject-rank 2 --inject-step 20")
    args = p.parse_args(argv)
    import tempfile

    import httpx

    run = f"bed-{uuid.uuid4().hex[:8]}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes what the bed made
    try:
        bed = TwoNodes()
    except BedUnavailable as err:
        print(f"two-nodes: {err}", file=sys.stderr)
        return 2
    with bed, tempfile.TemporaryDirectory(prefix="th-mn-") as tmp:
        config = Path(tmp) / "trainhealth.toml"
        config.write_text("[detectors.rank_stalled]\nsilence_floor_seconds = 5.0\nfloor_seconds = 10.0\n")
        port = 9464
        sidecars = [0] if args.topology == "job" else [0, 1]
        for node in sidecars:
            bed.popen(node, [sys.executable, "-m", "trainhealth", "serve", "--host", "0.0.0.0", "--port", str(port),
                             "--config", str(config), "--db", f"{tmp}/node{node}.db"],
                      env={**os.environ, "PYTHONPATH": str(ROOT)}, log=Path(tmp) / f"sidecar{node}.log")
        urls = [f"http://{bed.addr(n)}:{port}" for n in sidecars]
        for url in urls:
            _wait(lambda u=url: httpx.get(u + "/healthz", timeout=2).status_code == 200, 30)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
        env.update({"PYTHONPATH": str(ROOT), "TRAINHEALTH_RUN": run, "TRAINHEALTH_HEARTBEAT_SECONDS": "0.5",
                    "TRAINHEALTH_FLUSH_SECONDS": "0.5",
                    "TRAINHEALTH_URL": f"http://{{master}}:{port}" if args.topology == "job"
                    else f"http://127.0.0.1:{port}"})
        trainer = ["-m", "trainhealth.trainer", "--steps", "100000", "--step-sleep", "0.05", "--log-every", "200",
                   *args.trainer_args]
        for node in (0, 1):
            bed.torchrun(node, 29400, trainer, env, log=Path(tmp) / f"torchrun{node}.log")
        print(f"two-nodes: run {run}, one sidecar per {args.topology}: {', '.join(urls)}", file=sys.stderr)
        _wait(lambda: all(_min_step(u, run) >= 10 for u in urls), 120)
        if args.down_after > 0:
            time.sleep(args.down_after)
            bed.node_down(1)
            print("two-nodes: node-1 is down (link cut, every process killed)" + (
                "; per node, node-1's sidecar went with it: node-0's sidecar sees its own ranks wait (a "
                "Prometheus scraping both raises TrainhealthNodeDown, docs/deploy.md)" if args.topology == "node"
                else ""), file=sys.stderr)
            urls = urls[:1]
        time.sleep(args.watch)
        for url in urls:
            for a in httpx.get(url + "/v1/alerts", params={"run": run}, timeout=5).json()["alerts"][::-1]:
                print(f"{url}: {a['state']} {a['alert']}: {a['summary']}")
    return 0


def _min_step(url: str, run: str) -> int:
    import httpx

    try:
        answer = httpx.get(f"{url}/v1/runs/{run}", timeout=2)
    except httpx.HTTPError:
        return -1
    return int(answer.json().get("min_step") or 0) if answer.status_code == 200 else -1


def _wait(ok: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ok():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"two-nodes: gave up after {timeout:.0f} s")
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(_main())

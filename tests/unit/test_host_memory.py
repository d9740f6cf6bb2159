"""Host memory: PSS of the process and its children, RSS where PSS is not reported."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import psutil
from trainhealth.trainer.host_memory import HostMemory, process_tree_bytes

from .trainer_fakes import Clock


class FakeProc:
    def __init__(self, pss, rss, children=(), denied=False):
        self._pss, self._rss, self._children, self._denied = pss, rss, list(children), denied

    def children(self, recursive=False):
        return self._children

    def memory_full_info(self):
        if self._denied:
            raise psutil.AccessDenied(pid=1)
        return SimpleNamespace(pss=self._pss, rss=self._rss) if self._pss is not None else SimpleNamespace(
            rss=self._rss)

    def memory_info(self):
        return SimpleNamespace(rss=self._rss)


class GoneProc(FakeProc):
    def memory_full_info(self):
        raise psutil.NoSuchProcess(pid=2)


def test_pss_of_the_process_and_its_workers_is_summed():
    workers = [FakeProc(pss=30, rss=100), FakeProc(pss=20, rss=100)]
    assert process_tree_bytes(FakeProc(pss=50, rss=100, children=workers)) == 100


def test_rss_is_used_where_pss_is_not_reported_or_not_readable_and_gone_children_are_skipped():
    children = [FakeProc(pss=None, rss=40), FakeProc(pss=1, rss=60, denied=True), GoneProc(0, 0)]
    assert process_tree_bytes(FakeProc(pss=5, rss=10, children=children)) == 105


def test_real_process_tree_includes_a_child_process():
    me = psutil.Process()
    alone = process_tree_bytes(me)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        psutil.Process(child.pid).memory_info()  # the child exists
        with_child = process_tree_bytes(me)
    finally:
        child.communicate(b"")
    assert alone > 0 and with_child > alone


def test_sampled_every_interval_only():
    clock = Clock()
    proc = FakeProc(pss=10, rss=20)
    vm = SimpleNamespace(total=1000, available=600)
    probe = HostMemory(interval=5.0, proc=proc, virtual_memory=lambda: vm, monotonic=clock)
    assert probe.sample() == {"host_mem_bytes": 10, "host_mem_total_bytes": 1000,
                              "host_mem_available_bytes": 600}
    proc._pss = 99
    clock.now += 4.9
    assert probe.sample()["host_mem_bytes"] == 10
    clock.now += 0.1
    assert probe.sample()["host_mem_bytes"] == 99

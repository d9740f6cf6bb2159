"""Host memory: PSS of the process and its children, RSS where PSS is not reported."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import psutil
import pytest
from trainhealth.trainer.host_memory import HostMemory, cgroup_limit, memory_limit, parse_size, process_tree_bytes

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
    probe = HostMemory(interval=5.0, proc=proc, virtual_memory=lambda: vm, monotonic=clock, limit=lambda: None)
    assert probe.sample() == {"host_mem_bytes": 10, "host_mem_total_bytes": 1000,
                              "host_mem_available_bytes": 600}
    proc._pss = 99
    clock.now += 4.9
    assert probe.sample()["host_mem_bytes"] == 10
    clock.now += 0.1
    assert probe.sample()["host_mem_bytes"] == 99


# -- the process's own memory limit ------------------------------------------------------------

def cgroup_tree(tmp_path, self_cgroup, files):
    """A fake /sys/fs/cgroup under tmp_path: {relative path: content}; and a /proc/self/cgroup."""
    for rel, content in files.items():
        f = tmp_path / "cg" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(content)
    (tmp_path / "self").write_text(self_cgroup)
    return tmp_path / "cg", tmp_path / "self"


def test_cgroup_v2_limit_is_the_smallest_of_the_cgroup_and_its_ancestors(tmp_path):
    root, me = cgroup_tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/pod1/ctr/memory.max": "max\n", "kubepods/pod1/memory.max": "4294967296\n",
        "kubepods/memory.max": "8589934592\n"})
    assert cgroup_limit(root, me) == 4294967296


def test_cgroup_v1_limit_in_bytes_and_its_unlimited_sentinel(tmp_path):
    root, me = cgroup_tree(tmp_path, "4:memory:/job/42\n3:cpu:/job/42\n", {
        "memory/job/42/memory.limit_in_bytes": "2147483648\n",
        "memory/job/memory.limit_in_bytes": "9223372036854771712\n"})
    assert cgroup_limit(root, me) == 2147483648
    root, me = cgroup_tree(tmp_path / "b", "4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712"})
    assert cgroup_limit(root, me) is None


@pytest.mark.parametrize("self_cgroup", ["0::/\n", "garbage\n", ""])
def test_no_limit_or_nothing_readable_is_none(tmp_path, self_cgroup):
    root, me = cgroup_tree(tmp_path, self_cgroup, {"memory.max": "max"})
    assert cgroup_limit(root, me) is None
    assert cgroup_limit(tmp_path / "nowhere", tmp_path / "missing") is None


@pytest.mark.parametrize(("text", "value"), [("2147483648", 2**31), ("2G", 2**31), ("2GiB", 2**31), ("2g", 2**31),
                                             ("1.5GB", 1.5e9), ("512M", 512 * 2**20), ("512 MiB", 512 * 2**20),
                                             ("100KB", 1e5), ("1T", 2**40)])
def test_memory_limit_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["two gigs", "-1G", "0", "1.5X", "G"])
def test_bad_memory_limit_sizes_name_the_variable_and_value(text):
    with pytest.raises(ValueError, match=rf"TRAINHEALTH_MEMORY_LIMIT: .*{text!r}"):
        parse_size(text)


def test_environment_override_wins_and_a_bad_one_falls_back_to_the_cgroup(tmp_path, caplog):
    root, me = cgroup_tree(tmp_path, "0::/job\n", {"job/memory.max": "4294967296"})
    assert memory_limit({"TRAINHEALTH_MEMORY_LIMIT": "1G"}, root, me) == 2**30
    assert memory_limit({}, root, me) == 4294967296
    assert memory_limit({"TRAINHEALTH_MEMORY_LIMIT": "lots"}, root, me) == 4294967296
    assert "TRAINHEALTH_MEMORY_LIMIT" in caplog.text and "'lots'" in caplog.text


def test_probe_sends_the_limit_below_the_machine_and_rereads_it_every_minute():
    clock = Clock()
    vm = SimpleNamespace(total=64e9, available=40e9)
    limits = iter([2e9, 3e9])
    probe = HostMemory(interval=5.0, proc=FakeProc(pss=1e9, rss=1e9), virtual_memory=lambda: vm,
                       monotonic=clock, limit=lambda: next(limits))
    assert probe.sample()["host_mem_limit_bytes"] == 2e9
    clock.now += 30
    assert probe.sample()["host_mem_limit_bytes"] == 2e9  # not re-read yet
    clock.now += 30
    assert probe.sample()["host_mem_limit_bytes"] == 3e9


def test_probe_sends_no_limit_when_there_is_none_or_it_is_above_the_machine_or_unreadable():
    vm = SimpleNamespace(total=64e9, available=40e9)
    for limit in (lambda: None, lambda: 128e9):
        probe = HostMemory(proc=FakeProc(pss=1, rss=1), virtual_memory=lambda: vm, monotonic=Clock(), limit=limit)
        assert "host_mem_limit_bytes" not in probe.sample()

    def broken():
        raise PermissionError("denied")

    probe = HostMemory(proc=FakeProc(pss=1, rss=1), virtual_memory=lambda: vm, monotonic=Clock(), limit=broken)
    assert probe.sample()["host_mem_bytes"] == 1 and "host_mem_limit_bytes" not in probe.sample()


def test_the_real_probe_degrades_cleanly_on_this_machine():
    fields = HostMemory(interval=0.0).sample()
    assert fields["host_mem_bytes"] > 0
    limit = fields.get("host_mem_limit_bytes")
    assert limit is None or 0 < limit < fields["host_mem_total_bytes"]

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


# -- the kernel's facts: the limiting cgroup's usage, events, pressure -------------------------------------

def test_cgroup_v2_facts_of_the_limiting_cgroup(tmp_path):
    from trainhealth.trainer.host_memory import KernelMemory, limiting_cgroup, oom_kills

    root, me = cgroup_tree(tmp_path, "0::/job/rank\n", {
        "job/rank/memory.max": "max\n", "job/memory.max": "2147483648\n",
        "job/memory.current": "1500000000\n", "job/memory.stat": "anon 1000\ninactive_file 300000000\nactive_file 5\n",
        "job/memory.events": "low 0\nhigh 7\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n",
        "job/memory.pressure": "some avg10=1.50 avg60=0.20 avg300=0.00 total=1234\nfull avg10=0.00 avg60=0.00 "
                               "avg300=0.00 total=0\n"})
    found = limiting_cgroup(root, me)
    assert found is not None and (found.path, found.version, found.limit) == (root / "job", 2, 2147483648)
    assert oom_kills(found.path, 2) == 2
    kernel = KernelMemory({}, root, me, proc=tmp_path / "noproc")
    assert kernel.limit() == 2147483648
    assert kernel.facts() == {"host_mem_cgroup": str(root / "job"), "host_mem_cgroup_bytes": 1.2e9,
                              "host_mem_oom_kills": 2, "host_mem_max_events": 12, "host_mem_high_events": 7,
                              "host_mem_pressure": 1.5}


def test_cgroup_v1_facts_and_the_machines_pressure(tmp_path):
    from trainhealth.trainer.host_memory import KernelMemory

    root, me = cgroup_tree(tmp_path, "4:memory:/job/42\n3:cpu:/job/42\n", {
        "memory/job/42/memory.limit_in_bytes": "1073741824\n", "memory/job/42/memory.usage_in_bytes": "900000000\n",
        "memory/job/42/memory.stat": "cache 5\ninactive_file 1\ntotal_inactive_file 100000000\n",
        "memory/job/42/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        "memory/job/42/memory.failcnt": "40\n"})
    proc = tmp_path / "proc"
    (proc / "pressure").mkdir(parents=True)
    (proc / "pressure" / "memory").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    kernel = KernelMemory({}, root, me, proc=proc)
    assert kernel.limit() == 1073741824
    assert kernel.facts() == {"host_mem_cgroup": str(root / "memory/job/42"), "host_mem_cgroup_bytes": 8e8,
                              "host_mem_oom_kills": 1, "host_mem_max_events": 40, "host_mem_pressure": 0.0}


def test_no_cgroup_limit_sends_the_machines_oom_kills_and_an_environment_limit_no_cgroup_usage(tmp_path):
    from trainhealth.trainer.host_memory import KernelMemory

    root, me = cgroup_tree(tmp_path, "0::/job\n", {"job/memory.max": "max\n", "job/memory.current": "5\n"})
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "vmstat").write_text("nr_free_pages 1\noom_kill 3\n")
    kernel = KernelMemory({}, root, me, proc=proc)
    assert kernel.limit() is None and kernel.facts() == {"host_mem_oom_kills": 3}
    root, me = cgroup_tree(tmp_path / "b", "0::/job\n", {"job/memory.max": "4294967296\n", "job/memory.current": "5\n"})
    kernel = KernelMemory({"TRAINHEALTH_MEMORY_LIMIT": "1G"}, root, me, proc=proc)
    assert kernel.limit() == 2**30 and kernel.facts() == {"host_mem_oom_kills": 3}  # not that cgroup's limit


def test_probe_sends_the_kernels_facts_with_every_sample_and_never_breaks_on_them():
    clock = Clock()
    vm = SimpleNamespace(total=64e9, available=40e9)
    facts = iter([{"host_mem_cgroup": "/cg", "host_mem_cgroup_bytes": 1e9, "host_mem_oom_kills": 0},
                  {"host_mem_cgroup": "/cg", "host_mem_cgroup_bytes": 2e9, "host_mem_oom_kills": 1}])
    probe = HostMemory(interval=5.0, proc=FakeProc(pss=1e9, rss=1e9), virtual_memory=lambda: vm, monotonic=clock,
                       limit=lambda: 4e9, kernel=lambda: next(facts))
    assert probe.sample()["host_mem_cgroup_bytes"] == 1e9
    clock.now += 5
    fields = probe.sample()
    assert (fields["host_mem_cgroup_bytes"], fields["host_mem_oom_kills"], fields["host_mem_limit_bytes"]) == (
        2e9, 1, 4e9)
    clock.now += 5
    assert probe.sample()["host_mem_bytes"] == 1e9  # the reader failed (StopIteration): no facts, no crash
    unlimited = HostMemory(proc=FakeProc(pss=1, rss=1), virtual_memory=lambda: vm, monotonic=Clock(),
                           limit=lambda: None, kernel=lambda: {"host_mem_cgroup_bytes": 5.0, "host_mem_oom_kills": 0})
    assert unlimited.sample() == {"host_mem_bytes": 1, "host_mem_total_bytes": 64e9,
                                  "host_mem_available_bytes": 40e9, "host_mem_oom_kills": 0}


def test_the_real_kernel_facts_of_this_machine_are_well_formed():
    from trainhealth.trainer.host_memory import KernelMemory

    kernel = KernelMemory({})
    limit = kernel.limit()
    facts = kernel.facts()
    assert limit is None or limit > 0
    assert set(facts) <= {"host_mem_cgroup", "host_mem_cgroup_bytes", "host_mem_oom_kills", "host_mem_max_events",
                          "host_mem_high_events", "host_mem_pressure"}
    assert all(isinstance(facts[k], int) and facts[k] >= 0 for k in facts if k.endswith(("_kills", "_events")))
    if "host_mem_pressure" in facts:
        assert 0.0 <= facts["host_mem_pressure"] <= 100.0

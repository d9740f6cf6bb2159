"""The Host check's names (http/hosts.py) and the body budget's settings (http/bodies.py), without a server:
tests/integration/test_dns_rebinding.py and test_body_budget.py run them in a real sidecar."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainhealth.config import ConfigError, load
from trainhealth.http.bodies import default_budget
from trainhealth.http.hosts import HostNames, host_name


@pytest.mark.parametrize("header, name", [
    ("127.0.0.1:9464", "127.0.0.1"), ("[::1]:9464", "::1"), ("[::1]", "::1"), ("::1", "::1"),
    ("Evil.Example.:80", "evil.example"), ("localhost", "localhost"), ("a:b:c", "a:b:c"), ("", ""),
    ("[fe80::1%eth0]:1", "fe80::1%eth0"),
])
def test_host_name_drops_the_port_the_brackets_the_case_and_the_trailing_dot(header: str, name: str) -> None:
    assert host_name(header) == name


def test_the_names_allowed_by_default_and_by_configuration() -> None:
    default = HostNames([], "127.0.0.1", machine="gpu-node-3.cluster.local")
    allowed = ["localhost", "127.0.0.1", "::1", "10.1.2.3", "fe80::1%eth0", "gpu-node-3", "gpu-node-3.cluster.local"]
    refused = ["evil.example", "gpu-node-3.evil.example", "cluster.local", "127.0.0.1.nip.io", "2130706433", "",
               "localhost.evil.example", "sidecar"]
    assert [n for n in allowed if not default.allows(n)] == []
    assert [n for n in refused if default.allows(n)] == []
    bound = HostNames(["Sidecar", "*.corp.example."], "trainhealth.internal", machine="0123abcd")
    assert [bound.allows(n) for n in ("sidecar", "trainhealth.internal", "a.corp.example", "corp.example",
                                      "evilcorp.example", "0123abcd")] == [True, True, True, False, False, True]
    assert HostNames(["*"], "127.0.0.1").allows("evil.example")


@pytest.mark.parametrize("text, message", [
    ('[server]\nallowed_hosts = ["http://sidecar"]\n', "server.allowed_hosts[0]: must be a host name without "
     "scheme or port (sidecar, node-a.example.com, *.example.com) or \"*\", got 'http://sidecar'"),
    ('[server]\nallowed_hosts = ["ok", "sidecar:9464"]\n', "server.allowed_hosts[1]: must be a host name"),
    ('[server]\nallowed_hosts = ["a b"]\n', "server.allowed_hosts[0]: must be a host name"),
    ('[server]\nallowed_hosts = "sidecar"\n', "server.allowed_hosts: must be a list of strings, got 'sidecar'"),
    ("[limits]\nmax_buffered_bytes = 1000\n", "limits.max_buffered_bytes: must be an integer >= "
     "limits.max_body_bytes (16777216, one whole body), got 1000"),
    ("[limits]\nmax_body_bytes = 100\nmax_buffered_bytes = 99\n", "limits.max_buffered_bytes: must be an integer "
     ">= limits.max_body_bytes (100, one whole body), got 99"),
])
def test_bad_allowed_hosts_and_budgets_are_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(str(path), {}, {})
    assert str(err.value).startswith(message), str(err.value)


def test_allowed_hosts_come_from_the_flag_over_the_environment_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nallowed_hosts = ["from-file"]\n')
    assert load(str(path), {}, {}).server.allowed_hosts == ["from-file"]
    env = {"TRAINHEALTH_ALLOWED_HOSTS": "a.example,b.example"}
    assert load(str(path), {}, env).server.allowed_hosts == ["a.example", "b.example"]
    assert load(str(path), {"allowed_hosts": ["*"]}, env).server.allowed_hosts == ["*"]


def test_the_default_budget_is_sixteen_bodies_or_one_per_connection() -> None:
    assert default_budget(16 << 20, 4096) == 256 << 20
    assert default_budget(16 << 20, 4) == 64 << 20
    assert load(None, {}, {}).limits.max_buffered_bytes is None  # not set: the default above, at start

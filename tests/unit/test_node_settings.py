"""Where a rank sends and what it calls its node: ``TRAINHEALTH_URL=http://{master}:PORT`` (one sidecar per
job, on torchrun's rendezvous host) and ``TRAINHEALTH_NODE``; ``TRAINHEALTH_HOST`` (the sidecar's bind
address) still names the client's host, with a deprecation warning, unless it is an address."""

from __future__ import annotations

import logging
import socket

import pytest
from trainhealth.trainer.settings import from_environ


def test_master_in_the_url_is_the_rendezvous_host_torchrun_gives_every_rank():
    env = {"TRAINHEALTH_URL": "http://{master}:9464", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500"}
    assert from_environ(env).url == "http://10.1.2.3:9464"
    env["MASTER_ADDR"] = "trainer-master-0.job.svc"  # a PyTorchJob's master service
    assert from_environ(env).url == "http://trainer-master-0.job.svc:9464"
    env["MASTER_ADDR"] = "fd00::7"
    assert from_environ(env).url == "http://[fd00::7]:9464"


def test_master_without_master_addr_is_this_machine_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, "trainhealth.trainer"):
        settings = from_environ({"TRAINHEALTH_URL": "https://{master}:9464/"})
    assert settings.url == "https://127.0.0.1:9464"
    assert "MASTER_ADDR is not set" in caplog.text


def test_an_explicit_url_wins_and_is_not_rewritten():
    env = {"TRAINHEALTH_URL": "http://{master}:9464", "MASTER_ADDR": "10.1.2.3"}
    assert from_environ(env, url="http://sidecar:1").url == "http://sidecar:1"


def test_trainhealth_node_names_the_host(caplog):
    with caplog.at_level(logging.WARNING, "trainhealth.trainer"):
        assert from_environ({"TRAINHEALTH_NODE": "node-1", "TRAINHEALTH_HOST": "0.0.0.0"}).host == "node-1"
    assert caplog.text == ""  # TRAINHEALTH_HOST is the sidecar's here: nothing to warn about


def test_the_old_trainhealth_host_still_names_it_with_a_deprecation_warning(caplog):
    with caplog.at_level(logging.WARNING, "trainhealth.trainer"):
        assert from_environ({"TRAINHEALTH_HOST": "node-b"}).host == "node-b"
    assert "TRAINHEALTH_HOST=node-b as the client's host name is deprecated: set TRAINHEALTH_NODE" in caplog.text


@pytest.mark.parametrize("address", ["0.0.0.0", "127.0.0.1", "10.0.0.7", "::"])
def test_a_bind_address_in_trainhealth_host_is_not_taken_as_the_host_name(caplog, address):
    with caplog.at_level(logging.WARNING, "trainhealth.trainer"):
        assert from_environ({"TRAINHEALTH_HOST": address}).host == socket.gethostname()
    assert f"ignoring TRAINHEALTH_HOST={address} for the host name" in caplog.text


def test_no_node_setting_is_the_machine_name():
    assert from_environ({}).host == socket.gethostname()


def test_the_sidecars_alertmanager_node_label_comes_from_the_file_else_trainhealth_node(tmp_path):
    from trainhealth.config import ConfigError, load
    from trainhealth.notify.alertmanager import postable

    env = {"TRAINHEALTH_ALERTMANAGER": "http://am:9093", "TRAINHEALTH_NODE": "node-1"}
    settings = load(None, {}, env)
    assert settings.alertmanager is not None and settings.alertmanager.node == "node-1"
    alert = {"alert": "rank_stalled", "run": "r", "rank": None, "severity": "critical", "summary": "s", "step": 3,
             "started_at": 1.0, "state": "firing", "fingerprint": "r/-/rank_stalled"}
    (pushed,) = postable([alert], 2.0, 60.0, settings.alertmanager.node)  # type: ignore[list-item]
    assert pushed["labels"] == {"alertname": "rank_stalled", "run": "r", "severity": "critical",
                                "source": "trainhealth", "node": "node-1"}
    path = tmp_path / "t.toml"
    path.write_text('[alertmanager]\nnode = "gpu-7"\n')
    assert load(str(path), {}, env).alertmanager.node == "gpu-7"  # type: ignore[union-attr]
    path.write_text('[alertmanager]\nnode = "a b"\n')
    with pytest.raises(ConfigError, match="alertmanager.node: must be 0-128 characters of"):
        load(str(path), {}, env)
    assert load(None, {}, {"TRAINHEALTH_ALERTMANAGER": "http://am:9093"}).alertmanager.node == ""  # type: ignore[union-attr]

"""Service.reload: everything re-read and checked as at start; a refused reload changes nothing."""

from __future__ import annotations

from pathlib import Path

from trainhealth.config import load
from trainhealth.service import Service


def test_a_refused_reload_keeps_every_running_threshold(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[detectors.rank_stalled]\nfloor_seconds = 30\n")
    service = Service(load(str(path)), load_settings=lambda: load(str(path)))
    path.write_text("[detector.rank_stalled]\nfloor_seconds = 5\n")  # the typo that used to reset to defaults
    assert service.reload()["reloaded"] is False
    assert service.settings.detectors["rank_stalled"].floor_seconds == 30
    assert service.pipeline.detector_settings["rank_stalled"].floor_seconds == 30


def test_a_good_reload_applies_thresholds_and_tells_the_reloaders(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[detectors.rank_stalled]\nfloor_seconds = 30\n")
    told = []
    service = Service(load(str(path)), load_settings=lambda: load(str(path)), reloaders=[told.append])
    path.write_text('[detectors.rank_stalled]\nfloor_seconds = 45\n[[webhooks]]\nurl = "http://h/x"\n')
    assert service.reload() == {"reloaded": True}
    assert service.pipeline.detector_settings["rank_stalled"].floor_seconds == 45
    assert [w.url for w in told[0].webhooks] == ["http://h/x"] and service.settings.webhooks == told[0].webhooks


def test_without_a_loader_there_is_nothing_to_reload() -> None:
    assert Service(load()).reload() == {
        "reloaded": False, "error": "no configuration to reload (started without --config)"}


def test_server_webhooks_apply_live_but_the_port_needs_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 9000\n")
    told = []
    service = Service(load(str(path)), load_settings=lambda: load(str(path)), reloaders=[told.append])
    path.write_text('[server]\nport = 9000\nwebhooks = ["http://h/x"]\nalertmanager = "http://am:9093"\n')
    assert service.reload() == {"reloaded": True}
    assert [w.url for w in told[0].webhooks] == ["http://h/x"] and told[0].alertmanager.url == "http://am:9093"
    path.write_text("[server]\nport = 9001\n")
    assert service.reload() == {"reloaded": False,
                                "error": "server.port: needs a restart (running 9000, the config now says 9001)"}

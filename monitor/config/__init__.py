"""The configuration in one place: every section's settings, the rules they are checked by, and the loader.

- ``rules.py``: ``ConfigError`` and the checks every section uses (one-line errors naming the dotted key and
  the value), and ``build()``, a section's dataclass from its TOML table;
- ``sections.py``: ``[server]``, ``[limits]``, ``[exporter]``, ``[[webhooks]]``, ``[alertmanager]``;
- ``load.py``: ``Settings`` (every section, the detectors' included) and ``load()``, which maps the TOML
  file, the ``TRAINHEALTH_*`` environment and the flags onto it.

Each detector's settings dataclass lives beside the detector and is checked by the same rules; the loader
finds it by the detector's ``name`` (``[detectors.NAME]``). The keys are documented in docs/config.md.
"""

from __future__ import annotations

from .load import (
    ENV_PREFIX,
    SECTIONS,
    Settings,
    alertmanager_settings,
    default_detector_settings,
    detector_settings,
    load,
    read_toml,
    webhook_settings,
)
from .rules import ConfigError, build
from .sections import (
    AlertmanagerSettings,
    ExporterSettings,
    Limits,
    RetryPolicy,
    ServerSettings,
    StopSettings,
    WebhookSettings,
)

__all__ = ["ENV_PREFIX", "SECTIONS", "AlertmanagerSettings", "ConfigError", "ExporterSettings", "Limits",
           "RetryPolicy", "ServerSettings", "Settings", "StopSettings", "WebhookSettings", "alertmanager_settings",
           "build", "default_detector_settings", "detector_settings", "load", "read_toml", "webhook_settings"]

"""trainhealth's training side (``trainhealth.trainer``): the telemetry client and the reference trainer
(``python -m trainhealth.trainer``).

Usable without the sidecar's code; torch is needed only for the torch helpers and the trainer.
"""

from .client import Telemetry

__all__ = ["Telemetry"]

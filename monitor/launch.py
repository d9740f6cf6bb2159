"""``python -m trainhealth.launch [--] COMMAND ...``: run a rank under the watcher that reports how it
ends (trainhealth.trainer.launch; docs/liveness.md, "Deaths")."""

from __future__ import annotations

from .trainer.launch import main

if __name__ == "__main__":
    main()

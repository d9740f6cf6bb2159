"""``python -m trainhealth.trainer``: the reference trainer (see trainer/train.py)."""

import sys

from .train import main

sys.exit(main())

"""``python -m encoder_service``: same as ``sam2-encoder``."""

from __future__ import annotations

import sys

from encoder_service.cli import main

sys.exit(main())

"""``python -m decoder_service``: same as ``sam2-decoder``."""

from __future__ import annotations

import sys

from decoder_service.cli import main

sys.exit(main())

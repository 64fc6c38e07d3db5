"""``python -m gatewayd`` is the same program as the ``gatewayd`` command."""

from __future__ import annotations

import sys

from gatewayd.cli import main

sys.exit(main())

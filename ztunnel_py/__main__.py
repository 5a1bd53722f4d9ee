"""``python -m ztunnel_py`` is the ``ztunnel-py`` command."""

from __future__ import annotations

import sys

from ztunnel_py.cli import main

sys.exit(main())

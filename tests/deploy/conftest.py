"""tests/deploy: the chart, images and cluster tooling, checked offline. ``tools/`` (helmchart,
crd_validate, chart_check) is not a package: put it on ``sys.path`` for every test here."""

from __future__ import annotations

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

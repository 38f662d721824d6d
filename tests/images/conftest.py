"""tests/images: the service images built by ``make images`` (tools/images.py), run with podman.

``tools/`` is not a package: it goes on ``sys.path`` here. The tests need the images: without
them they fail and say so (they run only under ``-m images``, from ``make images-smoke``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


@pytest.fixture(scope="session")
def podman():
    import images

    images.require_host_tools()
    handle = images.Podman.default()
    missing = [t for t in images.CPU_TARGETS if not handle.exists(images.image_name(t))]
    if missing:
        pytest.fail(f"images not built: {', '.join(missing)} (run: make images)")
    return handle


@pytest.fixture(scope="session")
def local_broker() -> None:
    """The images' smoke test needs the broker: without one it fails (tests/conftest.py's skips)."""
    from broker_check import MISSING, broker_answers  # tests/support

    if not broker_answers():
        pytest.fail(MISSING)

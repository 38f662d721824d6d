"""helora orchestrator: the data owner's client."""

import os

__version__ = "0.1.0"

# The client alternates torch (OpenMP pool) and numpy (OpenBLAS pool) hundreds of times per step.
# OpenMP threads that spin-wait after each torch op starve OpenBLAS and vice versa: measured on
# 2 cores at SmolLM2 width, one step took 10.2 s with the default policy, 3.1 s with PASSIVE.
# Effective only if set before torch is first imported; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

"""The federated mode's schemes and their defaults (no heavy imports: the CLI reads them to parse)."""

from __future__ import annotations

#: how owners protect their updates: every coordinate encrypted (``encsum``, the default), or
#: SHE-LoRA's selected columns of ``A`` (``selective``, the paper's method and our baseline)
SCHEMES = ("full", "selective")

#: the default bound on one coordinate of ``w_i·ΔW_i`` (sample count times the update): LoRA
#: products sit near 1e-3..1e-1, so owners of up to a few hundred samples fit with room to spare
DEFAULT_UPDATE_RANGE = 64.0

"""The federated mode's schemes and their defaults (no heavy imports: the CLI reads them to parse)."""

from __future__ import annotations

#: how owners protect their updates: every coordinate encrypted (``encsum``, the default), or
#: SHE-LoRA's selected columns of ``A`` (``selective``, the paper's method and our baseline)
SCHEMES = ("full", "selective")

#: the default bound on one coordinate of ``w_i·ΔW_i`` (sample count times the update). LoRA
#: products sit near 1e-3..1e-1; three owners of the bundled corpus (4,000 to 5,900 samples each)
#: reach about 100 after two local steps at lr 1e-2, so 1024 leaves a tenfold margin and still
#: 17 fractional bits for 3 owners (a step of ~1e-9 on their average ΔW)
DEFAULT_UPDATE_RANGE = 1024.0

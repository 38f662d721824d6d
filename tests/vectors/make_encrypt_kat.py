"""Regenerates tests/vectors/encrypt_kat_v1.json: a fixed secret, message, seed and noise.

The inputs are derived from SHAKE-256 of fixed labels (public test data, not key material).
Run only when the encryption format changes on purpose: the test pins its output.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
from hecommon.he import params as P
from hecommon.he.encrypt import _encrypt_with
from hecommon.he.keys import RequestSecret


def _bytes(label: str, n: int) -> np.ndarray:
    return np.frombuffer(hashlib.shake_256(label.encode()).digest(n), dtype=np.uint8)


def main() -> None:
    ps = P.DEFAULT
    s = (_bytes("kat-secret", ps.n) % 3).astype(np.int64) - 1
    m = (_bytes("kat-message", 3 * 5).reshape(5, 3)).astype(np.int64)
    noise = (_bytes("kat-noise", 3 * ps.n) % 9).astype(np.int64).reshape(3, ps.n) - 4
    seed = hashlib.sha256(b"kat-seed").digest()[:16]
    ct = _encrypt_with(RequestSecret(ps, s), m, seed, noise[:, None, :].repeat(ps.limbs, axis=1))
    out = {
        "pset": ps.name,
        "a_seed": seed.hex(),
        "secret": s.tolist(),
        "message": m.tolist(),
        "noise": noise.tolist(),
        "sha256_b": hashlib.sha256(ct.b.astype("<u4").tobytes()).hexdigest(),
    }
    path = Path(__file__).with_name("encrypt_kat_v1.json")
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

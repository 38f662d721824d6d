"""helora's wire format (DESIGN §3 Transport, §4, §7 invariant 4).

- ``codec``: the field checks and msgpack framing every message family shares;
- ``messages``: the training messages (requests, partials, replies, errors, the manifest), their
  header-only heads and their chunking; re-exported here, so ``hecommon.wire.X`` is the API;
- ``federated``: the federated-aggregation messages.
"""

from .messages import *  # noqa: F403 - the message API as hecommon.wire.X

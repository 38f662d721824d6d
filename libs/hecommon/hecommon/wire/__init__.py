"""helora's wire format (DESIGN §3 Transport, §4, §7 invariant 4).

- ``codec``: the msgpack framing and the field checks every message family shares;
- ``fields``: the training messages' version, limits, field checks and array codecs;
- ``messages``: the training messages (requests, partials, replies); ``serde``: every
  encode/decode pair; ``error_reply``: the error every service answers with; ``manifest``: the manifest and its
  layer entries;
- ``heads``: messages read without their arrays; ``chunks``: cutting messages below the message
  limit and putting them back together (``split``, ``join``; ``Gather``, the one reassembly of
  every family, and ``PartTracker`` on it);
- ``federated``: the federated-aggregation messages (``hecommon.wire.federated``), with their
  constants, CKKS layout and field checks (``fedfields``) and chunking (``fedchunks``).

Everything but ``codec`` and the federated modules is re-exported here: ``hecommon.wire.X`` is the API.
"""

from .chunks import *  # noqa: F403
from .error_reply import *  # noqa: F403
from .fields import *  # noqa: F403
from .heads import *  # noqa: F403
from .manifest import *  # noqa: F403
from .messages import *  # noqa: F403
from .serde import *  # noqa: F403

"""helora's wire format (DESIGN §3 Transport, §4, §7 invariant 4).

- ``codec``: the msgpack framing and the field checks every message family shares;
- ``fields``: the training messages' version, limits, field checks and array codecs;
- ``messages``: the training messages (requests, partials, replies, errors) and every
  encode/decode pair; ``manifest``: the manifest and its layer entries;
- ``heads``: messages read without their arrays; ``chunks``: cutting messages below the message
  limit and putting them back together (``split``, ``join``, ``PartTracker``);
- ``federated``: the federated-aggregation messages (``hecommon.wire.federated``).

Everything but ``codec`` and ``federated`` is re-exported here: ``hecommon.wire.X`` is the API.
"""

from .chunks import *  # noqa: F403
from .fields import *  # noqa: F403
from .heads import *  # noqa: F403
from .manifest import *  # noqa: F403
from .messages import *  # noqa: F403

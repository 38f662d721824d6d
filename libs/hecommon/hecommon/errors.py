"""Exception tree. Each class maps to one action of a service (STYLE: errors map to actions).

- ``TransientError``: requeue the message and try again later.
- ``MalformedMessage``, ``ParameterMismatch``, ``OversizedMessage``: dead-letter with a reason.
- ``DecryptionError``: says nothing about the key or the plaintext.
"""

from __future__ import annotations


class HeloraError(Exception):
    """Base of every error helora raises on purpose."""

    #: short machine-readable reason, used as a metric label and a dead-letter header
    reason = "error"


class ConfigError(HeloraError, ValueError):
    """A configuration or parameter value is invalid; the message names the field."""

    reason = "config"


class InsecureParameters(ConfigError):
    """A parameter set falls below 128-bit security by the HomomorphicEncryption.org table."""

    reason = "insecure_parameters"


class TransientError(HeloraError):
    """A temporary failure (broker, device memory): the message may be retried."""

    reason = "transient"


class ServiceTimeout(HeloraError):
    """A service waited too long for another one; the message names the layer and who did not answer."""

    reason = "timeout"


class MalformedMessage(HeloraError, ValueError):
    """A message does not decode: bad schema, truncated bytes, shape mismatch, bad types."""

    reason = "malformed"


class UnsupportedVersion(MalformedMessage):
    """The message's schema version is not the one this build speaks."""

    reason = "version"


class OversizedMessage(MalformedMessage):
    """A payload is larger than the configured limit."""

    reason = "oversized"


class ParameterMismatch(HeloraError, ValueError):
    """The message names a parameter set, model or layer that this service does not serve."""

    reason = "parameter_mismatch"


class DecryptionError(HeloraError):
    """Decryption failed. Deliberately carries no detail about the key or the data."""

    reason = "decryption"


class InexactLayer(ConfigError):
    """A layer's sums cannot be made exact (DESIGN §3): refused before anything is encrypted.
    The message names the layer, the width of its sum and the bound."""

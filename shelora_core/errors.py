"""The package's exceptions: one small hierarchy, each naming what was wrong and the fix.

Every error a user or a remote party can cause derives from :class:`SheloraError`, so a driver
can tell "this input was refused" from a bug (a bare ``KeyError`` / ``TypeError`` is a bug).
The classes keep the built-in base a caller would have caught before (``ValueError`` for bad
values, ``RuntimeError`` for state on disk), so ``except ValueError`` keeps working.

* :class:`ConfigError`: a configuration field has a bad type or value (raised when the config is
  built, naming the field).
* :class:`MessageError`: bytes that are not a valid message (truncated, corrupted, another
  protocol version, the wrong kind, non-finite values).
* :class:`ProtocolError`: a well-formed message that does not fit the round: another round,
  method or key, a client that was not asked or answered twice, shapes, ranks, column lists,
  sample counts or ciphertext counts other than the round expects. It carries ``client_id``
  (``None`` when the sender is unknown) and a short ``reason`` code for records.
* :class:`RoundError`: too few valid uploads remain to aggregate a round; ``rejected`` lists
  the refused ones.
* :class:`CheckpointError`: a checkpoint or key directory that is missing, damaged, from another
  configuration or inconsistent; never silently replaced.

:class:`shelora_core.ckks.CKKSError` (bad CKKS parameters, ciphertexts, keys) and
:class:`shelora_core.negotiation.NegotiationError` also derive from :class:`SheloraError`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MessageError",
    "ProtocolError",
    "RoundError",
    "SheloraError",
]


class SheloraError(Exception):
    """Base class of every error shelora raises on purpose."""


class ConfigError(SheloraError, ValueError):
    """A configuration field has a bad type or value; the message names the field and the fix."""


class MessageError(SheloraError, ValueError):
    """Bytes that are not a valid message: truncated, corrupted, the wrong kind or bad values."""


class ProtocolError(MessageError):
    """A well-formed message that does not fit the round (see the module docstring).

    Attributes:
        client_id: the sender, when known.
        reason: a short code for round records (``"duplicate"``, ``"round"``, ``"shape"``, ...).
    """

    def __init__(self, message: str, *, client_id: Any = None, reason: str = "invalid") -> None:
        super().__init__(message)
        self.client_id = client_id
        self.reason = reason


class RoundError(ProtocolError):
    """Fewer valid uploads than ``min_clients`` remain: the round cannot be aggregated.

    Attributes:
        rejected: one ``{"client_id", "reason", "error"}`` record per refused upload.
    """

    def __init__(self, message: str, *, rejected: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message, reason="too_few_clients")
        self.rejected = list(rejected or [])


class CheckpointError(SheloraError, RuntimeError):
    """A checkpoint or key directory that is missing, damaged, foreign or inconsistent."""

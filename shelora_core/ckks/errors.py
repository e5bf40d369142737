"""The one exception type of the CKKS package.

Notes
-----
:class:`CKKSError` is a ``ValueError``: every module of :mod:`shelora_core.ckks` raises it for bad
parameters, bytes that are not a context or a ciphertext, and ciphertexts encrypted under
another key, with a message that names the offending quantity and what to change.
"""

from __future__ import annotations

from ..errors import SheloraError

__all__ = ["CKKSError"]


class CKKSError(SheloraError, ValueError):
    """Bad CKKS parameters, bytes that are not a context / ciphertext, or a key mismatch."""

"""What a run records or shows of what was typed, scrubbed of secrets: a Ray address without its credentials.

Every manifest, recorded command, log line and error that names a Ray address goes through here.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def public_address(address: str | None) -> str | None:
    """The address without user, password, query or fragment: safe for manifests and messages.

    >>> public_address("ray://me:s3cret@head:10001/?token=x")
    'ray://head:10001/'
    """
    if not address or "://" not in address:
        return address
    parts = urlsplit(address)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"

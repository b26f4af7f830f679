"""Who may use the proxy: API keys (Bearer, compared in constant time) and CORS.

Rules kept here:
- keys live only as SHA-256 digests once read; neither a key nor a digest is ever logged or shown
  (`repr` gives the count);
- comparison is constant-time in the key and in which key matched: every configured digest is
  compared, with hmac.compare_digest, on digests of equal length;
- /health and CORS preflights need no key (browsers send no credentials on a preflight);
- with no keys configured, the admin routes answer only loopback peers.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from llama_smart_proxy.schemas.config import ProxySettings
from llama_smart_proxy.supervisor.errors import UserError
from llama_smart_proxy.supervisor.proxy.http import Headers, HttpError, header_value


class ApiKeyFileError(UserError):
    """The api_keys_file cannot be read."""


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ApiKeys:
    """The accepted Bearer keys."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = tuple(_digest(k.encode()) for k in keys if k)

    @classmethod
    def from_settings(cls, settings: ProxySettings) -> ApiKeys:
        """Keys from `api_keys` and `api_keys_file` (one per line; blank lines, # comments skipped)."""
        keys = [secret.get_secret_value() for secret in settings.api_keys]
        if settings.api_keys_file is not None:
            keys.extend(read_key_file(settings.api_keys_file))
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, headers: Headers) -> bool:
        """Whether `Authorization: Bearer <key>` names one of the keys."""
        value = header_value(headers, b"authorization")
        if value is None:
            return False
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        offered = _digest(token.strip())
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(offered, digest)
        return matched

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._digests)} keys)"


def read_key_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyFileError(f"{path}: proxy.api_keys_file: cannot read: {exc.__class__.__name__}") from None
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


UNAUTHORIZED = HttpError(
    401,
    "Missing or invalid API key: send Authorization: Bearer <key>",
    type="authentication_error",
    code="invalid_api_key",
    headers=[(b"www-authenticate", b"Bearer")],
)


def is_loopback(peer_host: str) -> bool:
    try:
        return ipaddress.ip_address(peer_host).is_loopback
    except ValueError:
        return False


CORS_MAX_AGE = b"600"  # seconds a browser may cache a preflight answer
CORS_METHODS = b"GET, POST, OPTIONS"
CORS_DEFAULT_HEADERS = b"authorization, content-type"


@dataclass(frozen=True)
class Cors:
    """Which browser origins may call the proxy."""

    origins: frozenset[str]

    @classmethod
    def from_settings(cls, settings: ProxySettings) -> Cors:
        return cls(frozenset(settings.cors_origins))

    @property
    def enabled(self) -> bool:
        return bool(self.origins)

    def allow_origin(self, headers: Headers) -> bytes | None:
        """The Access-Control-Allow-Origin value for this request, or None."""
        if not self.origins:
            return None
        origin = header_value(headers, b"origin")
        if origin is None:
            return None
        if "*" in self.origins:
            return b"*"
        return origin if origin.decode("latin-1") in self.origins else None

    def response_headers(self, headers: Headers) -> Headers:
        allowed = self.allow_origin(headers)
        if allowed is None:
            return []
        return [(b"access-control-allow-origin", allowed), (b"vary", b"Origin")]

    def preflight_headers(self, headers: Headers) -> Headers | None:
        """Headers for a CORS preflight (OPTIONS with Access-Control-Request-Method), or None
        when this is not one or the origin is not allowed."""
        if header_value(headers, b"access-control-request-method") is None:
            return None
        allowed = self.allow_origin(headers)
        if allowed is None:
            return None
        requested = header_value(headers, b"access-control-request-headers")
        return [
            (b"access-control-allow-origin", allowed),
            (b"vary", b"Origin"),
            (b"access-control-allow-methods", CORS_METHODS),
            (b"access-control-allow-headers", requested or CORS_DEFAULT_HEADERS),
            (b"access-control-max-age", CORS_MAX_AGE),
        ]

"""Who may use the proxy: API keys (Bearer, compared in constant time) and CORS.

Rules kept here:
- keys live only as SHA-256 digests once read; neither a key nor a digest is ever logged or shown
  (`repr` gives the count);
- comparison is constant-time in the key and in which key matched: every configured digest is
  compared, with hmac.compare_digest, on digests of equal length;
- /health and CORS preflights need no key (browsers send no credentials on a preflight);
- the admin routes take admin keys (`admin_api_keys`), and any other key gets 403 there; admin keys
  are accepted on every other route too;
- without admin keys: when `api_keys` are set the admin routes are off (403), since a key for the
  models must not also reload or stop them and a loopback peer may be a reverse proxy on this host;
  with no keys at all they answer loopback peers only, as the rest of the proxy answers anyone.
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
    """The accepted Bearer keys: `api_keys` for the models and own routes, `admin_api_keys` for the
    admin routes (and every other route)."""

    def __init__(self, keys: list[str], admin_keys: list[str] | None = None) -> None:
        self._digests = tuple(_digest(k.encode()) for k in keys if k)
        self._admin = tuple(_digest(k.encode()) for k in admin_keys or () if k)

    @classmethod
    def from_settings(cls, settings: ProxySettings) -> ApiKeys:
        """Keys from `api_keys`, `admin_api_keys` and their files (one per line; blank lines, #
        comments skipped)."""
        keys = [secret.get_secret_value() for secret in settings.api_keys]
        if settings.api_keys_file is not None:
            keys.extend(read_key_file(settings.api_keys_file))
        admin = [secret.get_secret_value() for secret in settings.admin_api_keys]
        if settings.admin_api_keys_file is not None:
            admin.extend(read_key_file(settings.admin_api_keys_file, "admin_api_keys_file"))
        return cls(keys, admin)

    @property
    def enabled(self) -> bool:
        """Whether the routes other than /health and the admin ones need a key."""
        return bool(self._digests)

    def _role(self, headers: Headers) -> str | None:
        """'admin', 'user' or None for the request's `Authorization: Bearer <key>`."""
        value = header_value(headers, b"authorization")
        if value is None:
            return None
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        offered = _digest(token.strip())
        user = admin = False
        for digest in self._digests:
            user |= hmac.compare_digest(offered, digest)
        for digest in self._admin:
            admin |= hmac.compare_digest(offered, digest)
        return "admin" if admin else "user" if user else None

    def accepts(self, headers: Headers) -> bool:
        """Whether `Authorization: Bearer <key>` names one of the keys (an admin key included)."""
        return self._role(headers) is not None

    def admin_refusal(self, headers: Headers, peer_host: str) -> HttpError | None:
        """Why this request may not use an admin route, or None when it may."""
        if self._admin:
            role = self._role(headers)
            if role == "admin":
                return None
            return _admin_key_needed() if role == "user" else unauthorized()
        if self._digests:
            return _admin_off()
        if not is_loopback(peer_host):
            return _admin_loopback_only()
        return None

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._digests)} keys, {len(self._admin)} admin keys)"


def read_key_file(path: Path, key: str = "api_keys_file") -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyFileError(f"{path}: proxy.{key}: cannot read: {exc.__class__.__name__}") from None
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


# Each refusal is a new exception: one instance raised again and again would grow its traceback
# (and the frames it holds) with every raise.


def unauthorized() -> HttpError:
    return HttpError(
        401,
        "Missing or invalid API key: send Authorization: Bearer <key>",
        type="authentication_error",
        code="invalid_api_key",
        headers=[(b"www-authenticate", b"Bearer")],
    )


def _admin_key_needed() -> HttpError:
    return HttpError(
        403,
        "This key may not use the admin routes: they take a key from proxy.admin_api_keys",
        type="permission_error",
        code="admin_key_required",
    )


def _admin_off() -> HttpError:
    return HttpError(
        403,
        "The admin routes are off: proxy.api_keys is set but proxy.admin_api_keys is not "
        "(reload with SIGHUP or serve --watch)",
        type="permission_error",
        code="admin_disabled",
    )


def _admin_loopback_only() -> HttpError:
    return HttpError(
        403,
        "Without API keys the admin routes answer only this host; set proxy.admin_api_keys to use "
        "them from another",
        type="permission_error",
        code="forbidden",
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

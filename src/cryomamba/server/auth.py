"""Who is asking, and may they: JWT bearer tokens with scopes, and HMAC-signed artifact URLs.

Tokens are HS256 JWTs with `sub`, `scopes`, `iat` and `exp`, minted by
`cryomamba token create` with the server's secret. Signed URLs carry `exp` and
`sig = HMAC-SHA256(secret, "job/artifact/exp")`, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass

import jwt

from .errors import ApiError

__all__ = [
    "SCOPES",
    "Principal",
    "check_signature",
    "decode_token",
    "mint_token",
    "parse_duration",
    "sign_artifact",
]

SCOPES = ("read", "upload", "submit", "admin")
ISSUER = "cryomamba"
_BEARER_HINT = (
    "send `Authorization: Bearer <token>`; get a token from the server's operator "
    "(`cryomamba token create`)"
)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's subject and scopes (admin implies every scope)."""

    subject: str
    scopes: frozenset[str]

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def require(self, scope: str) -> None:
        if scope not in self.scopes and not self.admin:
            raise ApiError(
                403,
                "insufficient_scope",
                f"this token lacks the {scope!r} scope",
                f"ask for a token with --scopes {scope} (it has: "
                f"{', '.join(sorted(self.scopes)) or 'none'})",
            )

    def owns(self, owner: str) -> bool:
        return self.admin or owner == self.subject


def mint_token(secret: bytes, subject: str, scopes: list[str], ttl_s: float) -> str:
    """A signed token for `subject` with `scopes`, valid for `ttl_s` seconds."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s) {unknown}; choose from {', '.join(SCOPES)}")
    now = int(time.time())
    claims = {
        "sub": subject,
        "scopes": sorted(set(scopes)),
        "iat": now,
        "exp": now + int(ttl_s),
        "iss": ISSUER,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def decode_token(secret: bytes, token: str) -> Principal:
    """Check signature, expiry and issuer; 401 with a reason otherwise."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            issuer=ISSUER,
            options={"require": ["sub", "exp", "iat"]},
        )
    except jwt.ExpiredSignatureError:
        raise ApiError(
            401, "token_expired", "the token has expired", "ask for a new token"
        ) from None
    except jwt.InvalidTokenError as exc:
        raise ApiError(
            401, "invalid_token", f"the token is not valid: {exc}", _BEARER_HINT
        ) from None
    scopes = claims.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ApiError(401, "invalid_token", "the token's scopes are malformed", _BEARER_HINT)
    return Principal(str(claims["sub"]), frozenset(scopes))


def missing_token() -> ApiError:
    return ApiError(401, "missing_token", "this route needs a bearer token", _BEARER_HINT)


def _mac(secret: bytes, job_id: str, artifact: str, exp: int) -> str:
    msg = f"{job_id}/{artifact}/{exp}".encode()
    return hmac.new(secret, b"artifact-url:" + msg, hashlib.sha256).hexdigest()


def sign_artifact(secret: bytes, job_id: str, artifact: str, ttl_s: float) -> tuple[str, int]:
    """The signed path of one artifact and its expiry (Unix seconds)."""
    exp = int(time.time() + ttl_s)
    sig = _mac(secret, job_id, artifact, exp)
    return f"/v1/files/{job_id}/{artifact}?exp={exp}&sig={sig}", exp


def check_signature(secret: bytes, job_id: str, artifact: str, exp: str | None, sig: str | None):
    """403 for a missing or wrong signature, 410 for an expired URL."""
    if not exp or not sig:
        raise ApiError(
            403,
            "missing_signature",
            "this URL needs `exp` and `sig` query parameters",
            "take artifact URLs from GET /v1/jobs/{id}; they are signed and expire",
        )
    try:
        exp_i = int(exp)
    except ValueError:
        raise ApiError(
            403,
            "bad_signature",
            "the URL's `exp` is not an integer",
            "use the artifact URL exactly as the server gave it",
        ) from None
    # as bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500)
    if not hmac.compare_digest(
        _mac(secret, job_id, artifact, exp_i).encode(), sig.encode("utf-8", "surrogateescape")
    ):
        raise ApiError(
            403,
            "bad_signature",
            "the URL's signature does not match",
            "use the artifact URL exactly as the server gave it",
        )
    if exp_i < time.time():
        raise ApiError(
            410,
            "url_expired",
            "this download URL has expired",
            "GET /v1/jobs/{id} again for fresh artifact URLs",
        )


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '12h', '30d' → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        unit = units.get(text[-1:], 1)
        value = float(text[:-1] if unit != 1 or text[-1:] == "s" else text) * unit
    except ValueError:
        raise ValueError(f"expected a duration like 90s, 15m, 12h or 30d, got {text!r}") from None
    if not value > 0 or math.isinf(value):  # also refuses nan
        raise ValueError(f"a duration must be positive and finite, got {text!r}")
    return value

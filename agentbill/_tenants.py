"""Tenant keys as the clients read them: ``agb_<prefix>.<key id>.<secret>``, no I/O.

A tenant is a namespace, and each of its keys is a Redis ACL user confined to the namespace's
keys and commands (``agentbill._key_admin`` creates and revokes them). ``<prefix>`` is the
namespace as every key name starts with it (``_keys.namespace_prefix``: percent-quoted, so it
holds no ``:`` and no glob character); the ACL user is ``agentbill:<prefix>:<key id>``. The key
is readable up to the last dot, secret after it.

:func:`parse_api_key` reads a key for the clients: a string starting with ``agb_`` and holding
a ``.`` is a key and must be well formed (InvalidRequestError naming ``api_key`` otherwise);
any other ``api_key`` (``"agb_your_key"``, say) is a label, accepted and never sent anywhere.
No function here puts a secret into a repr, a message or a log line.
"""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, SecretStr, StringConstraints

from agentbill._exceptions import InvalidRequestError
from agentbill._keys import namespace_prefix
from agentbill._models import ClientSettings, Id, validate
from agentbill._topology import credentials

__all__ = ["TenantKey", "parse_api_key"]

KEY_PREFIX = "agb_"
USER_PREFIX = "agentbill:"
KEY_ID_PATTERN = r"[0-9a-f]{16}"

_API_KEY = re.compile(
    rf"agb_(?P<prefix>[A-Za-z0-9_.~%-]+)"  # the namespace prefix: it may hold dots
    rf"\.(?P<key_id>{KEY_ID_PATTERN})"
    rf"\.(?P<secret>[A-Za-z0-9_-]{{43}})"  # secrets.token_urlsafe(32)
)
_MALFORMED = (
    "is not a well-formed agentbill key: expected agb_<namespace>.<key id>.<secret>, as "
    "printed by `python -m agentbill keys create` (check for missing or extra characters)"
)


class TenantKey(BaseModel):
    """A parsed ``agb_...`` key: the tenant's namespace, the key's id, and its secret."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    namespace: Id
    key_id: Annotated[str, StringConstraints(pattern=rf"^{KEY_ID_PATTERN}$")]
    secret: SecretStr

    @property
    def username(self) -> str:
        """The Redis ACL user this key authenticates as."""
        return username_for(self.namespace, self.key_id)


def username_for(namespace: str, key_id: str) -> str:
    """``agentbill:<prefix>:<key id>``: the prefix holds no ``:``, so the name splits in three."""
    return f"{USER_PREFIX}{namespace_prefix(namespace)}:{key_id}"


def is_key(api_key: str) -> bool:
    """Whether ``api_key`` claims to be an agentbill key (then it must parse). A key copied
    with leading blanks still claims to be one: it is refused, never taken for a label."""
    return api_key.lstrip().startswith(KEY_PREFIX) and "." in api_key


def parse_api_key(api_key: str) -> TenantKey | None:
    """The key in ``api_key``; None if it is a label (no ``agb_`` prefix, or no ``.``).

    Raises InvalidRequestError naming ``api_key`` when it claims to be a key but is malformed.
    The message never contains the value.
    """
    if not is_key(api_key):
        return None
    match = _API_KEY.fullmatch(api_key)
    if match is None:
        raise InvalidRequestError("api_key", _MALFORMED)
    prefix = match["prefix"]
    try:
        namespace = unquote(prefix, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequestError("api_key", _MALFORMED) from None
    if namespace_prefix(namespace) != prefix:
        raise InvalidRequestError("api_key", _MALFORMED)
    try:
        return validate(
            TenantKey,
            namespace=namespace,
            key_id=match["key_id"],
            secret=SecretStr(match["secret"]),
        )
    except InvalidRequestError:
        raise InvalidRequestError("api_key", _MALFORMED) from None


def format_key(namespace: str, key_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}{namespace_prefix(namespace)}.{key_id}.{secret}"


# -- the clients' side ---------------------------------------------------------------------


def tenant_namespace(key: TenantKey, namespace: object) -> str:
    """The namespace a client with ``key`` uses: the key's. ``namespace`` may be left at its
    default or equal the key's; any other value raises InvalidRequestError naming it."""
    default = ClientSettings.model_fields["namespace"].default
    if namespace in (default, key.namespace):
        return key.namespace
    raise InvalidRequestError(
        "namespace", "differs from the namespace of api_key: a key works only in its own"
    )


def settings_key(settings: ClientSettings) -> TenantKey | None:
    """The key in the settings' ``api_key``, or None (no api_key, or a label)."""
    if settings.api_key is None:
        return None
    return parse_api_key(settings.api_key.get_secret_value())


def check_url(settings: ClientSettings, url: str | None) -> None:
    """With a key, refuse the embedded server (``url`` None: it has no tenants) and a URL with
    credentials of its own (redis-py would let them override the key's).

    Raises InvalidRequestError naming ``api_key`` or ``redis_url``; the URL is never quoted.
    """
    if settings_key(settings) is None:
        return
    if url is None:
        raise InvalidRequestError(
            "api_key",
            "is a key for a shared Redis, but none is configured: pass redis_url= or set "
            "AGENTBILL_REDIS_URL (the embedded local server has no tenants)",
        )
    try:
        username, password = credentials(url)
    except ValueError:
        return  # the client reports a bad URL itself, as it does without a key
    if username or password:
        raise InvalidRequestError(
            "redis_url",
            "carries a username or password, and so does api_key: leave them out of the URL",
        )


def auth_options(settings: ClientSettings) -> dict[str, str]:
    """``username`` and ``password`` for redis-py when the settings hold a key, else nothing."""
    key = settings_key(settings)
    if key is None:
        return {}
    return {"username": key.username, "password": key.secret.get_secret_value()}

"""Who may do what in Zumik's Redis: its ACL users, their passwords' files, and URLs that carry them.

    user           keys                          commands                      password file
    default        off: no one can log in as it (see ``acl_user_lines`` for its rules)     -
    zumik-gateway  all (Zumik's own Redis)       all but @dangerous, plus      redis-gateway.password
                                                 INFO, CONFIG GET, BGREWRITEAOF
    zumik-kv       kv:* kvkey:*                  @read @write, scripts (not    redis-kv.password
                                                 FUNCTION), TIME PING SELECT;
                                                 none of @dangerous

The gateway owns every key (tenants, state, receipts, decision records, the KV data keys a purge
destroys: ``zumik:*``, ``z:*``, ``kv:*``, ``kvkey:*``; its scripts also name an empty key where an
optional one is absent, so a list of prefixes would refuse them), which is why Zumik needs a Redis
of its own; the engines only read and write KV blocks and their scopes' data keys, so a
compromised engine cannot become a tenant, read state or touch a receipt. ``@dangerous`` takes
away FLUSHALL, KEYS, DEBUG, CONFIG SET, ACL, MONITOR, SHUTDOWN and the like; the purge still needs
INFO, CONFIG GET and BGREWRITEAOF (it checks and compacts the AOF). No user has a pub/sub channel.

Rules kept here: a password is never put in a command line, a log line, a run file or an engine's
config. The ACL file holds SHA-256 hashes only (``#<hex>``). A URL that carries a password is
shown through ``redact_url``. A password file holds the password as text; a final newline is not
part of it (``kubectl create secret --from-file`` of ``openssl rand -hex 32 > f`` works).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from zumik_serve.secret_files import SecretFileError, read_secret_file

GATEWAY_USER = "zumik-gateway"
KV_USER = "zumik-kv"
GATEWAY_PASSWORD_FILE = "redis-gateway.password"
KV_PASSWORD_FILE = "redis-kv.password"

GATEWAY_KEY_PATTERNS = ("*",)
KV_KEY_PATTERNS = ("kv:*", "kvkey:*")
GATEWAY_COMMANDS = "+@all -@dangerous +info +config|get +bgrewriteaof"
# The key patterns are the boundary; within them the engines may read, write and run scripts
# (kvstore's RedisTier counts a scope's bytes in Lua, which needs TIME). No FUNCTION: a library
# the engines loaded would run with the gateway's rights when the gateway called it.
KV_COMMANDS = (
    "-@all +@read +@write -@dangerous +@scripting -function -fcall -fcall_ro -script|flush -script|kill "
    "+time +ping +select"
)

# Where a deployment's ACL file is rendered from (deploy/redis/users.acl.template): each
# placeholder becomes the SHA-256 of the password in the matching file.
PASSWORD_HASH_PLACEHOLDERS = {GATEWAY_USER: "GATEWAY_PASSWORD_SHA256", KV_USER: "KV_PASSWORD_SHA256"}


class RedisPasswordError(SecretFileError):
    """A Redis password file is missing, unreadable or not a usable password."""


class RedisAccessError(RuntimeError):
    """Redis refused a user (wrong password, user off, no user given) or one of its commands:
    a deployment's misconfiguration, reported at start with what to check."""


@dataclass(frozen=True)
class RedisPasswords:
    """The two users' passwords (never shown by ``repr``)."""

    gateway: str = field(repr=False)
    kv: str = field(repr=False)


@dataclass(frozen=True)
class EngineRedisAccess:
    """How an engine reaches Redis: ``url`` names the ``zumik-kv`` user but holds no password;
    the engine reads it from ``password_file``. ``password_file`` None: the Redis has no ACL
    users (a URL without a user name), and ``url`` is the gateway's URL as given."""

    url: str
    password_file: Path | None


def acl_user_lines(hashes: dict[str, str]) -> list[str]:
    """The ACL file's lines, with each user's password as ``hashes[user]`` (a SHA-256 hex, or a
    template placeholder). ``default`` is off: no one can log in as it, and a connection that
    does not AUTH can do nothing. It keeps every permission all the same, because Redis
    before the fix of redis/redis#14541 (7.0.15 here) replays an AOF's MULTI/EXEC as
    ``default`` and silently drops a transaction that user may not run: with ``-@all`` here, a
    restart loses acknowledged writes (tests/unit/test_local_redis.py's kill -9 test fails)."""
    return [
        "user default off resetpass ~* &* +@all",
        _user_line(GATEWAY_USER, hashes[GATEWAY_USER], GATEWAY_KEY_PATTERNS, GATEWAY_COMMANDS),
        _user_line(KV_USER, hashes[KV_USER], KV_KEY_PATTERNS, KV_COMMANDS),
    ]


def _user_line(user: str, password_hash: str, patterns: tuple[str, ...], commands: str) -> str:
    keys = " ".join(f"~{pattern}" for pattern in patterns)
    return f"user {user} on resetpass #{password_hash} resetkeys {keys} resetchannels {commands}"


def acl_file_text(passwords: RedisPasswords, extra_lines: tuple[str, ...] = ()) -> str:
    hashes = {GATEWAY_USER: password_sha256(passwords.gateway), KV_USER: password_sha256(passwords.kv)}
    return "\n".join([*acl_user_lines(hashes), *extra_lines]) + "\n"


def acl_template_text() -> str:
    """The ACL file with placeholders for the hashes (what deploy/redis ships)."""
    return "\n".join(acl_user_lines(dict(PASSWORD_HASH_PLACEHOLDERS))) + "\n"


def password_sha256(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def parse_password(data: bytes, path: Path) -> str:
    """A password file's text without its final newline; an empty or multi-line one is refused."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise RedisPasswordError(f"{path} is not UTF-8 text; write the password as text") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password or any(ch in password for ch in "\r\n\0"):
        raise RedisPasswordError(
            f"{path} must hold one line, the password (e.g. `openssl rand -hex 32 > {path.name}`)"
        )
    return password


def read_password(secrets: Path, name: str) -> str:
    path = secrets / name
    user = GATEWAY_USER if name == GATEWAY_PASSWORD_FILE else KV_USER
    try:
        data = read_secret_file(
            path,
            what=f"The password of Redis user {user}",
            how_to_fix=f"Put the password in {name} in the secrets folder (ZUMIK_SECRETS_DIR; a "
            "Kubernetes Secret mounted at /etc/zumik/secrets), as in deploy/redis/README.md.",
        )
    except SecretFileError as exc:
        raise RedisPasswordError(str(exc)) from None
    return parse_password(data, path)


def with_user(url: str, user: str, password: str | None = None) -> str:
    """``url`` with its user (and password, or none) replaced; the rest kept as is."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    userinfo = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def redact_url(url: str) -> str:
    """``url`` fit for a log line: its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, _ = parts.netloc.rpartition("@")[0].partition(":")
    return urlunsplit(parts._replace(netloc=f"{user}:***@{parts.netloc.rpartition('@')[2]}"))


def url_user(url: str) -> str:
    """The user a URL logs in as (Redis's ``default`` when it names none)."""
    return urlsplit(url).username or "default"


def engine_redis_access(gateway_url: str, secrets: Path) -> EngineRedisAccess:
    """The engines' access to the Redis the gateway reaches at ``gateway_url``: the same server,
    TLS and database as the user ``zumik-kv``, its password in ``secrets/redis-kv.password``
    (checked here, where the deployment is built, so a missing file stops the deploy)."""
    parts = urlsplit(gateway_url)
    if parts.username is None and parts.password is None:
        return EngineRedisAccess(url=gateway_url, password_file=None)
    if not parts.username:
        raise RedisPasswordError(
            "the Redis URL has a password but no user (requirepass): the engines' KV tiers need "
            f"the ACL users {GATEWAY_USER} and {KV_USER}; see deploy/redis/README.md"
        )
    read_password(secrets, KV_PASSWORD_FILE)
    return EngineRedisAccess(url=with_user(gateway_url, KV_USER), password_file=secrets / KV_PASSWORD_FILE)


def access_refused_message(url: str, exc: Exception) -> str:
    """What to check when Redis at ``url`` refused its user (``exc``: the refusal)."""
    where = urlsplit(url).netloc.rpartition("@")[2]
    user = url_user(url)
    return f"Redis at {where} refused user {user!r} ({type(exc).__name__}: {str(exc)[:120]}): {advice(user)}"


def advice(user: str) -> str:
    """What to check when Redis refuses ``user``."""
    if user == GATEWAY_USER:
        check = (
            f"check that the password in ZUMIK_REDIS_URL (or the Serve args' redis_url) is the one in "
            f"{GATEWAY_PASSWORD_FILE} and that Redis loaded the ACL file rendered from that file"
        )
    elif user == KV_USER:
        check = (
            f"check that {KV_PASSWORD_FILE} in the secrets folder (ZUMIK_SECRETS_DIR) is the one "
            "Redis's ACL file was rendered from"
        )
    else:
        check = (
            f"Zumik logs in as {GATEWAY_USER}: put it and its password in the URL, "
            f"redis://{GATEWAY_USER}:PASSWORD@HOST:PORT/0 (the default user is off)"
        )
    return f"{check}; see deploy/redis/README.md."

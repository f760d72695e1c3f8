"""Credentials: which configured values are secret, and how to keep them out of text.

- `mask_url`: a URL fit to print: its userinfo password and every credential-named
  query (or fragment) parameter replaced by ``***``. Every URL the product prints,
  logs, reports in a snapshot or puts in an error goes through it.
- `mask_urls_in`: the same for every URL inside a longer text.
- `url_secrets`: the credential values a URL carries (password, credential query
  values, and the HTTP Basic token a client derives from its userinfo), so that an
  upstream or a library that repeats them can be scrubbed.
- `header_is_secret`: whether a provider's extra header carries a credential (any
  ``env:`` value, and credential-named headers such as ``api-key``).
- `Scrubber`: hides a set of known secrets in text: each one whole, and any run of
  at least `partial_run` characters that is part of one, so that a secret cut by a
  length limit (or echoed in part by an upstream) never leaves a recognisable piece.
- `scrubbing`: makes a scrubber active for the synchronous code in its block; the
  error snippets of `router._classify` scrub with it *before* they cut text to length.
  `router._http` sets it around every call into a wire protocol.

What this module must never do: do I/O, or return a text that still holds a known
secret or a long piece of one.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from contextvars import ContextVar
from functools import lru_cache
from typing import Final
from urllib.parse import unquote

__all__ = [
    "MIN_SECRET",
    "PARTIAL_RUN",
    "Scrubber",
    "active_scrubber",
    "header_is_secret",
    "header_secret_values",
    "mask_url",
    "mask_urls_in",
    "partial_run",
    "scrubber_for",
    "scrubbing",
    "url_secrets",
]

MASK: Final = "***"

MIN_SECRET: Final = 4
"""Values shorter than this are not scrubbed: no credential is that short, and hiding
every occurrence of two or three characters would garble every message."""

PARTIAL_RUN: Final = 8
"""A run of this many characters of a (long enough) secret counts as the secret."""

# ----------------------------------------------------------------------------- URLs

_CREDENTIAL_WORDS: Final = frozenset(
    {
        "password",
        "passwd",
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "apikey",
        "accesstoken",
        "sig",
        "signature",
        "credential",
        "credentials",
        "auth",
        "authorization",
    }
)
_WORD_SPLIT: Final = re.compile(r"[_\-.\s]+")


def _credential_name(name: str) -> bool:
    """A parameter name like password, api_key, apiKey, access-token, X-Amz-Signature,
    client_secret or sig: one of its words (split at ``_ - .``, case-insensitive) is a
    credential word, or the whole name is (``apikey``, ``accesstoken``)."""
    lowered = unquote(name).strip().lower()
    if lowered in _CREDENTIAL_WORDS:
        return True
    return any(word in _CREDENTIAL_WORDS for word in _WORD_SPLIT.split(lowered))


def _split_url(url: str) -> tuple[str, str, str, str, str] | None:
    """(scheme, userinfo, rest of the authority and path, query, fragment), or None
    for a text that is no ``scheme://`` URL. The userinfo is what precedes the last
    ``@`` before the query: a password holding a raw ``/`` is still found."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    rest, hash_sign, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    userinfo, at, location = rest.rpartition("@")
    if not at:
        userinfo, location = "", rest
    else:
        userinfo += "@"
    return scheme, userinfo, location, question + query, hash_sign + fragment


def _mask_params(part: str) -> str:
    """``?a=1&password=x`` -> ``?a=1&password=***`` (also for a ``#`` fragment)."""
    if len(part) <= 1:
        return part
    lead, body = part[0], part[1:]
    pieces = re.split(r"([&;])", body)
    for index in range(0, len(pieces), 2):
        name, eq, value = pieces[index].partition("=")
        if eq and value and _credential_name(name):
            pieces[index] = f"{name}={MASK}"
    return lead + "".join(pieces)


def mask_url(url: str) -> str:
    """`url` with every credential replaced by ``***``: the userinfo password
    (``user:***@``; a userinfo without ``:`` is taken as a password: ``***@``) and
    the value of every query or fragment parameter named like a credential
    (password, pass, pwd, secret, token, key, api_key, apikey, access_token, sig,
    signature, ... in any case). ``env:VAR`` (a variable's name) and texts that are
    no ``scheme://`` URL are returned as they are."""
    if url.startswith("env:"):
        return url
    parts = _split_url(url)
    if parts is None:
        return url
    scheme, userinfo, location, query, fragment = parts
    if userinfo:
        user, colon, _ = userinfo[:-1].partition(":")
        userinfo = f"{user}:{MASK}@" if colon else f"{MASK}@"
    return f"{scheme}://{userinfo}{location}{_mask_params(query)}{_mask_params(fragment)}"


# A URL in prose: up to whitespace or a quote, not counting a final punctuation mark.
_URL_IN_TEXT: Final = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]*[^\s'\"<>.,;:!?)\]]")


def mask_urls_in(text: str) -> str:
    """`text` with every ``scheme://...`` URL in it passed through `mask_url`."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


def url_secrets(url: str) -> list[str]:
    """The credential values in `url` (as written and percent-decoded): its userinfo
    password (or a userinfo without ``:``), the Basic-auth token an HTTP client
    derives from ``user:password@``, and the values of credential-named query and
    fragment parameters."""
    if url.startswith("env:"):
        return []
    parts = _split_url(url)
    if parts is None:
        return []
    _, userinfo, _, query, fragment = parts
    found: list[str] = []
    if userinfo:
        user, colon, password = userinfo[:-1].partition(":")
        secret = password if colon else user
        found += [secret, unquote(secret)]
        if colon:
            pair = f"{unquote(user)}:{unquote(password)}"
            found.append(base64.b64encode(pair.encode()).decode("ascii"))
    for part in (query[1:], fragment[1:]):
        for piece in re.split(r"[&;]", part):
            name, eq, value = piece.partition("=")
            if eq and value and _credential_name(name):
                found += [value, unquote(value)]
    return list(dict.fromkeys(value for value in found if value))


# -------------------------------------------------------------------------- headers

_SECRET_HEADERS: Final = frozenset(
    {"api-key", "authorization", "x-api-key", "proxy-authorization", "cookie"}
)
_SECRET_SUFFIXES: Final = ("-key", "-token", "-secret", "_key", "_token", "_secret")


def header_is_secret(name: str, raw_value: str) -> bool:
    """Whether a provider's extra header carries a credential: any value given as
    ``env:VAR``, and any header named ``api-key``, ``authorization``, ``x-api-key``,
    ``proxy-authorization`` or ``cookie``, or ending in ``-key``, ``-token`` or
    ``-secret`` (case-insensitive)."""
    lowered = name.strip().lower()
    return (
        raw_value.startswith("env:")
        or lowered in _SECRET_HEADERS
        or lowered.endswith(_SECRET_SUFFIXES)
    )


def header_secret_values(value: str) -> list[str]:
    """A secret header's value, and its credential alone when it has a scheme
    (``Bearer abc`` -> ``abc`` too: an upstream may repeat either)."""
    value = value.strip()
    found = [value]
    scheme, space, credential = value.partition(" ")
    if space and credential.strip() and scheme.isalpha():
        found.append(credential.strip())
    return found


# ------------------------------------------------------------------------ scrubbing


def partial_run(length: int) -> int:
    """The shortest run of a secret of `length` characters that is scrubbed as the
    secret: `PARTIAL_RUN` (8) characters, or most (three quarters) of a shorter
    secret; a secret under 6 characters is only scrubbed whole."""
    if length < 6:
        return length
    return min(PARTIAL_RUN, length - length // 4)


class Scrubber:
    """Hides a fixed set of secrets: every whole occurrence, then every run of at
    least `partial_run` characters that occurs inside one of them (a prefix or suffix
    left by a cut, or any other piece), each replaced by `mask`.

    A fast gate keeps the common case (no piece of any secret in the text) cheap:
    any run of `L` characters of a secret contains one of the secret's substrings of
    ``L - k + 1`` characters that start at a multiple of ``k = L // 2``, so when none
    of those few needles occurs in the text, no run does.
    """

    __slots__ = ("_gate", "_grams", "_whole", "longest", "mask", "secrets")

    def __init__(self, secrets: Iterable[str], mask: str = MASK) -> None:
        unique = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=lambda s: (-len(s), s))
        self.secrets: tuple[str, ...] = tuple(unique)
        self.mask = mask
        self.longest = len(unique[0]) if unique else 0
        self._whole: re.Pattern[str] | None = (
            re.compile("|".join(map(re.escape, unique))) if unique else None
        )
        grams: dict[int, set[str]] = {}
        needles: set[str] = set()
        for secret in unique:
            run = partial_run(len(secret))
            if run >= len(secret):
                continue  # short: whole only
            grams.setdefault(run, set()).update(
                secret[i : i + run] for i in range(len(secret) - run + 1)
            )
            step = max(1, run // 2)
            width = run - step + 1
            needles.update(secret[i : i + width] for i in range(0, len(secret) - width + 1, step))
        self._grams = {run: frozenset(found) for run, found in sorted(grams.items())}
        self._gate: re.Pattern[str] | None = (
            re.compile("|".join(map(re.escape, sorted(needles, key=len, reverse=True))))
            if needles
            else None
        )

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def __repr__(self) -> str:
        return f"Scrubber(secrets={len(self.secrets)}, mask={self.mask!r})"

    def scrub(self, text: str) -> str:
        """`text` with every known secret, and every long piece of one, masked."""
        if self._whole is None or not text:
            return text
        text = self._whole.sub(self.mask, text)
        if self._gate is None or self._gate.search(text) is None:
            return text
        marked = bytearray(len(text))
        for run, grams in self._grams.items():
            for start in range(len(text) - run + 1):
                if text[start : start + run] in grams:
                    marked[start : start + run] = b"\x01" * run
        if not any(marked):
            return text
        out: list[str] = []
        position = 0
        length = len(text)
        while position < length:
            if marked[position]:
                end = marked.find(0, position)
                end = length if end < 0 else end
                out.append(self.mask)
                position = end
            else:
                end = marked.find(1, position)
                end = length if end < 0 else end
                out.append(text[position:end])
                position = end
        return "".join(out)


@lru_cache(maxsize=2048)
def _cached(secrets: tuple[str, ...], mask: str) -> Scrubber:
    return Scrubber(secrets, mask)


def scrubber_for(secrets: Iterable[str], mask: str = MASK) -> Scrubber:
    """A (cached) `Scrubber` for `secrets`."""
    return _cached(tuple(sorted(set(secrets))), mask)


_ACTIVE: ContextVar[Scrubber | None] = ContextVar("router_active_scrubber", default=None)


def active_scrubber() -> Scrubber | None:
    """The scrubber made active by the innermost `scrubbing` block, if any."""
    return _ACTIVE.get()


class scrubbing:
    """Make `scrubber` active for the block. Only for synchronous code: the block
    must not await or yield (the variable belongs to the task that set it). A class
    rather than a generator: it wraps every call into a wire protocol."""

    __slots__ = ("_scrubber", "_token")

    def __init__(self, scrubber: Scrubber | None) -> None:
        self._scrubber = scrubber

    def __enter__(self) -> None:
        self._token = _ACTIVE.set(self._scrubber)

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self._token)
        del self._token  # (not kept alive between uses: a stream's reader parks without it)

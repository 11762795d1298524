"""``pii_redact``: replace personal data and secrets in documents with typed placeholders.

Detectors (``kinds``), in the priority order used when two matches overlap (the earlier kind
wins, so a JWT assigned to ``token = "..."`` counts once, as ``jwt``):

* ``private_key``: a PEM block from ``-----BEGIN ... PRIVATE KEY-----`` (RSA, EC, DSA,
  OPENSSH, ENCRYPTED, PGP ``... PRIVATE KEY BLOCK``) to its ``-----END ...-----`` line, the
  whole block replaced; without an END line, the header and the base64 after it (at least
  64 characters). The body may contain base64, headers such as ``Proc-Type: 4,ENCRYPTED``,
  and the quotes and ``\\n`` escapes of a key pasted into a string literal, nothing else: a
  BEGIN and an END constant far apart in code are not one block.
* ``jwt``: ``eyJ<header>.eyJ<payload>.<signature>`` (base64url JSON; the signature may be
  empty, as in unsigned tokens).
* ``aws_access_key``: ``AKIA``, ``ASIA``, ``ABIA``, ``ACCA`` or ``A3T?`` and 16 more capitals
  or digits (AWS access key ids).
* ``api_token``: vendor prefixes: GitHub ``ghp_ gho_ ghu_ ghs_ ghr_`` (36+ characters) and
  ``github_pat_``, Slack ``xox[baprs]-``, OpenAI-style ``sk-`` (and ``sk-proj-``,
  ``sk-ant-``...), Stripe ``sk_live_``/``rk_test_``..., Google ``AIza`` + 35, GitLab
  ``glpat-``, Hugging Face ``hf_`` + 34 letters, npm ``npm_`` + 36, PyPI ``pypi-AgEIcHlwaS5vcmc``.
  The random part must mix at least two of lower case, upper case and digits, and after
  ``sk-`` hold 16 letters and digits in a row (``sk-Some-Hyphenated-Name-2`` is no key).
* ``assigned_secret``: a quoted string assigned to a name with a segment such as ``key``,
  ``secret``, ``token``, ``password``/``passwd``/``pwd``, ``passphrase``, ``credential(s)``,
  ``auth``/``authorization`` (segments split at ``_ - .`` and camelCase, so ``api_key``,
  ``clientSecret`` and ``"auth-token":`` count and ``monkey`` or ``tokenizer`` do not), with
  ``=``, ``:``, ``:=`` or ``=>``; also ``UPPER_NAME=value`` lines of .env and shell files.
  The value (an optional ``Bearer ``/``Basic ``/``token `` prefix is kept) is replaced when it
  has at least ``min_secret_length`` characters, no whitespace, ``:`` or ``/``, at least one
  letter and one digit, and a Shannon entropy of at least ``entropy_threshold`` bits per
  character. Only the value is replaced: ``api_key = "<KEY>"``.
* ``email``: ``local@domain.tld`` (ASCII; a top-level domain of 2-24 letters; not followed by
  ``.<alnum>`` so ``x@self.weight.T`` in code is no address). Every address is replaced,
  example.com's included, as BigCode's pipeline does.
* ``ip_address``: IPv4 dotted quads (no leading zeros, not part of a longer dotted run such as
  an OID) and IPv6 addresses, each validated with :mod:`ipaddress`. As in BigCode's PII
  pipeline, only addresses a reader could reach are replaced: private, loopback,
  link-local, unspecified (``0.0.0.0``, ``::``), documentation (``192.0.2.0/24``,
  ``2001:db8::/32``...), shared, reserved and multicast addresses are kept, and so are the
  popular public DNS resolvers (``8.8.8.8``, ``1.1.1.1``, ``9.9.9.9``...). Version-like
  quads are kept too: BigCode's rule (at most 8 characters, such as ``1.2.3.4``, unless
  ``dns`` or ``server`` appears within 100 characters), and any quad on a line with the word
  ``version`` (``__version__ = "12.34.56.78"``).
* ``phone``: ``+`` and a country code followed by 2-5 groups separated by spaces, dots or
  hyphens (``+44 20 7946 0958``, ``+1 (415) 555-0132``) or by a compact run
  (``+4915112345678``), 9 to 15 digits in all (E.164); and North American numbers written
  with separators, ``(415) 555-0132``, ``415-555-0132``, ``415.555.0132``, optionally with
  ``+1``/``1-`` (area code and exchange start with 2-9). Numbers without separators or a
  ``+`` are not matched: too many integers in code look like them.

Placeholders: ``<EMAIL>``, ``<IP_ADDRESS>``, ``<PHONE>`` and ``<KEY>`` for every secret kind;
``placeholders`` replaces some of them per kind. The output is a function of the text and
the parameters only, so parts can be redacted in any order by any number of workers.
"""
from __future__ import annotations

import bisect
import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from recipe_engine import Problems, Stage, StageContext, did_you_mean
from recipe_engine.artifacts import list_parts, read_documents, write_documents

from ._parts import clear_parts, file_stamp, merge_counts, place_parts, run_tasks, task_key

# kind -> default placeholder, in priority order (an earlier kind wins an overlap)
KINDS: dict[str, str] = {
    "private_key": "<KEY>",
    "jwt": "<KEY>",
    "aws_access_key": "<KEY>",
    "api_token": "<KEY>",
    "assigned_secret": "<KEY>",
    "email": "<EMAIL>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE>",
}

Span = tuple[int, int]

# -- secrets -------------------------------------------------------------------------------
# Speed: Python's re scans quickly for a pattern that starts with a literal and slowly for one
# that starts with a look-behind or a character class, so detectors find a literal anchor
# ("@", "+", a vendor prefix, "AKIA"...) or pass a cheap gate, then check the context by hand.

_TOKEN_CHAR = re.compile(r"[A-Za-z0-9_-]")
_ALNUM_CHAR = re.compile(r"[A-Za-z0-9]")


def _after_token_boundary(text: str, start: int, chars: re.Pattern[str] = _TOKEN_CHAR) -> bool:
    return start == 0 or not chars.match(text, start - 1)


_PEM_BEGIN = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY( BLOCK)?-----")
# what may lie between BEGIN and END: base64, headers, and the quotes, "+" and \n escapes of
# a key pasted into string literals
_PEM_BODY = re.compile(r"[A-Za-z0-9+/=\s:,\\\"'-]*")
_PEM_LINES = re.compile(r"(?:(?:\\n|[\s\"'+])*[A-Za-z0-9+/=]{16,})+")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{16,}")
MIN_KEY_BASE64 = 64  # a block holds at least this many base64 characters in runs of 16+


def _private_keys(text: str, _: Redactor) -> Iterator[Span]:
    if "PRIVATE KEY" not in text:
        return
    pos = 0
    while m := _PEM_BEGIN.search(text, pos):
        end_marker = f"-----END {m.group(1)}PRIVATE KEY{m.group(2) or ''}-----"
        body = _PEM_BODY.match(text, m.end())
        assert body is not None  # the pattern matches the empty string
        found = text.find(end_marker, m.end(), body.end())
        if found != -1:
            end = found + len(end_marker)
        else:  # no END line: the header and the base64 lines after it
            lines = _PEM_LINES.match(text, m.end())
            found = end = lines.end() if lines else m.end()
        if sum(map(len, _BASE64_RUN.findall(text, m.end(), found))) >= MIN_KEY_BASE64:
            yield m.start(), end
            pos = end
        else:
            pos = m.end()


_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\."
                  r"[A-Za-z0-9_-]*(?![A-Za-z0-9_-])")


def _jwts(text: str, _: Redactor) -> Iterator[Span]:
    if "eyJ" in text:
        for m in _JWT.finditer(text):
            yield m.span()


_AWS = re.compile(r"A(?:KIA|SIA|BIA|CCA|3T[A-Z0-9])[A-Z0-9]{16}(?![A-Za-z0-9])")


def _aws_keys(text: str, _: Redactor) -> Iterator[Span]:
    for m in _AWS.finditer(text):
        if _after_token_boundary(text, m.start(), _ALNUM_CHAR):
            yield m.span()


_TOKENS = [(literal, re.compile(literal + body + r"(?![A-Za-z0-9_-])")) for literal, body in [
    ("gh", r"[pousr]_(?P<key>[A-Za-z0-9]{36,255})"),
    ("github_pat_", r"(?P<key>[A-Za-z0-9_]{22,255})"),
    ("xox", r"[baprs]-(?P<key>[A-Za-z0-9]{10,48}(?:-[A-Za-z0-9]{1,64})*)"),
    ("sk-", r"(?:proj-|svcacct-|admin-|ant-(?:[a-z]{3}\d\d-)?)?(?P<key>[A-Za-z0-9_-]{20,255})"),
    ("k_", r"(?:live|test)_(?P<key>[A-Za-z0-9]{16,255})"),  # Stripe sk_live_, rk_test_...
    ("AIza", r"(?P<key>[A-Za-z0-9_-]{35})"),
    ("glpat-", r"(?P<key>[A-Za-z0-9_-]{20,255})"),
    ("hf_", r"(?P<key>[A-Za-z]{34})"),
    ("npm_", r"(?P<key>[A-Za-z0-9]{36})"),
    ("pypi-AgEIcHlwaS5vcmc", r"(?P<key>[A-Za-z0-9_-]{50,})"),
]]


_LONG_RUN = re.compile(r"[A-Za-z0-9]{16}")


def _mixed(s: str) -> bool:
    """At least two of: lower case, upper case, digits (random keys are; words are not)."""
    return sum((any(c.islower() for c in s), any(c.isupper() for c in s),
                any(c.isdigit() for c in s))) >= 2


def _api_tokens(text: str, _: Redactor) -> Iterator[Span]:
    for literal, pattern in _TOKENS:
        if literal not in text:
            continue
        for m in pattern.finditer(text):
            start = m.start()
            if literal == "k_":  # the s or r before it belongs to the token
                if start == 0 or text[start - 1] not in "sr":
                    continue
                start -= 1
            key = m.group("key")
            if literal == "sk-" and not _LONG_RUN.search(key):  # sk-some-hyphenated-words
                continue
            if _after_token_boundary(text, start) and _mixed(key):
                yield start, m.end()


_SECRET_WORDS = frozenset({"key", "apikey", "secret", "token", "password", "passwd", "pwd",
                           "passphrase", "credential", "credentials", "auth",
                           "authorization"})
# operator, optional string prefix, quoted value (after an optional Bearer/Basic/token)
_ASSIGNED = re.compile(r"[:=>][ \t]*[rbuRBU]{0,2}(?P<q>[\"'`])(?:(?:Bearer|Basic|token)\s+)?"
                       r"(?P<value>[^\s\"'`\\:/]{8,512})(?P=q)")
# the name before the operator: name, "name", 'name', x["name"], name: annotation
_ASSIGNED_NAME = re.compile(r"(?P<name>[A-Za-z_$][\w$.-]{0,80})[\"']?\]?"
                            r"(?:[ \t]*:[ \t]*[\w.\[\], |]{1,60}?)?[ \t]*$")  # : type annotation
_ENV_LINE = re.compile(r"\n[ \t]*(?:export[ \t]+)?(?P<name>[A-Z_][A-Z0-9_]*)[ \t]*=[ \t]*"
                       r"(?P<value>[A-Za-z0-9+=_.~!@#$%^&*-]{8,512})[ \t]*(?=\n)")
_SEGMENT = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def _secret_name(name: str) -> bool:
    return any(seg.lower() in _SECRET_WORDS for seg in _SEGMENT.findall(name))


def entropy(s: str) -> float:
    """Shannon entropy of ``s``'s characters, in bits per character."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) if n else 0.0


def _secret_value(value: str, r: Redactor) -> bool:
    return (len(value) >= r.min_secret_length and any(c.isalpha() for c in value)
            and any(c.isdigit() for c in value) and entropy(value) >= r.entropy_threshold)


def _assigned_secrets(text: str, r: Redactor) -> Iterator[Span]:
    for m in _ASSIGNED.finditer(text):
        if not _secret_value(m.group("value"), r):
            continue
        op = m.start()
        while op > 0 and text[op - 1] in ":=":  # := and the = of =>
            op -= 1
        name = _ASSIGNED_NAME.search(text, max(0, op - 90), op)
        if name and _secret_name(name.group("name")):
            yield m.span("value")
    for m in _ENV_LINE.finditer("\n" + text + "\n"):  # spans shift by the leading "\n"
        if _secret_name(m.group("name")) and _secret_value(m.group("value"), r):
            yield m.start("value") - 1, m.end("value") - 1


# -- personal data -------------------------------------------------------------------------

_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}$")
_EMAIL_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
                           r"(?![\w-]|\.[A-Za-z0-9])")
_LOCAL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")


def _emails(text: str, _: Redactor) -> Iterator[Span]:
    at = text.find("@")
    while at != -1:
        domain = _EMAIL_DOMAIN.match(text, at + 1)
        if domain:
            start = at
            while start > 0 and text[start - 1] in _LOCAL_CHARS and at - start < 65:
                start -= 1
            before = text[start - 1] if start else ""
            if (not (before.isalnum() or before == "_" or before in _LOCAL_CHARS)
                    and _EMAIL_LOCAL.match(text, start, at)):
                yield start, domain.end()
                at = text.find("@", domain.end())
                continue
        at = text.find("@", at + 1)


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\w)")
_IPV4_GATE = re.compile(r"\.\d{1,3}\.\d{1,3}\.\d")
_IPV6_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")
_HEX_COLON_DOT = _HEX_COLON | {"."}
# public resolvers, kept as BigCode's pipeline keeps them (plus their IPv6 addresses)
POPULAR_DNS_SERVERS = frozenset({
    "8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "76.76.19.19", "76.223.122.150", "9.9.9.9",
    "149.112.112.112", "208.67.222.222", "208.67.220.220", "8.26.56.26", "8.20.247.20",
    "94.140.14.14", "94.140.15.15",
    "2001:4860:4860::8888", "2001:4860:4860::8844", "2606:4700:4700::1111",
    "2606:4700:4700::1001", "2620:fe::fe", "2620:fe::9"})
_VERSION_WORD = re.compile(r"version", re.I)


def _reachable(candidate: str) -> bool:
    """A global unicast address that is not a well-known public resolver."""
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    if ip.version == 6 and ip.is_site_local:  # fec0::/10, deprecated, never global
        return False
    return (ip.is_global and not (ip.is_multicast or ip.is_reserved)
            and str(ip) not in POPULAR_DNS_SERVERS)


def _version_like(text: str, start: int, end: int) -> bool:
    if end - start <= 8:  # BigCode: x.x.x.x, x.xx.x.x are versions unless DNS/servers are near
        context = text[max(0, start - 100):end + 100].lower()
        if "dns" not in context and "server" not in context:
            return True
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    return _VERSION_WORD.search(text, line_start, len(text) if line_end < 0 else line_end) \
        is not None


def _ipv6_candidates(text: str) -> Iterator[Span]:
    end = -1
    for seed in _IPV6_SEED.finditer(text):
        if seed.start() < end:
            continue
        start, end = seed.start(), seed.end()
        while start > 0 and text[start - 1] in _HEX_COLON:
            start -= 1
        while end < len(text) and text[end] in _HEX_COLON_DOT:
            end += 1
        while text[end - 1] == ".":  # a full stop after the address
            end -= 1
        before = text[start - 1] if start else ""
        after = text[end] if end < len(text) else ""
        if not (before.isalnum() or before in "_.") and not (after.isalnum() or after == "_"):
            yield start, end


def _ip_addresses(text: str, _: Redactor) -> Iterator[Span]:
    if _IPV4_GATE.search(text):
        for m in _IPV4.finditer(text):
            if _reachable(m.group()) and not _version_like(text, *m.span()):
                yield m.span()
    for start, end in _ipv6_candidates(text):
        s = text[start:end]
        if any(c.isdigit() for c in s) and _reachable(s):
            yield start, end


_PHONE_INTL = re.compile(r"""\+[1-9]\d{0,2}
    (?: \d{6,12}                                        # compact: +4915112345678
      | (?:[ .-]?\(\d{1,4}\))? (?:[ .-]\d{1,4}){2,5}     # grouped: +44 20 7946 0958
    )(?![\w-]|\.\d)""", re.X)
# North American: the exchange and line number, then the area code (and +1) before them
_PHONE_NANP = re.compile(r"[2-9]\d\d[.-]\d{4}(?![\w-]|\.\d)")
_PHONE_NANP_HEAD = re.compile(r"(?:\+1[ .-]?|1-)?(?:\([2-9]\d\d\) ?|[2-9]\d\d[.-])$")
_PHONE_BEFORE = re.compile(r"[\w+.)\]-]")
_DIGIT = re.compile(r"\d")


def _phones(text: str, _: Redactor) -> Iterator[Span]:
    if "+" in text:
        for m in _PHONE_INTL.finditer(text):
            if (_after_token_boundary(text, m.start(), _PHONE_BEFORE)
                    and 9 <= len(_DIGIT.findall(m.group())) <= 15):
                yield m.span()
    for m in _PHONE_NANP.finditer(text):
        head = _PHONE_NANP_HEAD.search(text, max(0, m.start() - 12), m.start())
        if head and _after_token_boundary(text, head.start(), _PHONE_BEFORE):
            yield head.start(), m.end()


DETECTORS: dict[str, Callable[[str, Redactor], Iterator[Span]]] = {
    "private_key": _private_keys, "jwt": _jwts, "aws_access_key": _aws_keys,
    "api_token": _api_tokens, "assigned_secret": _assigned_secrets, "email": _emails,
    "ip_address": _ip_addresses, "phone": _phones,
}
assert list(DETECTORS) == list(KINDS)


@dataclass(frozen=True)
class Redactor:
    """The detectors a stage runs, with their settings; picklable for the workers."""

    kinds: tuple[str, ...]  # in KINDS order
    placeholders: tuple[tuple[str, str], ...]
    entropy_threshold: float
    min_secret_length: int

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """The text with every match replaced, and the number of replacements per kind."""
        starts: list[int] = []
        spans: list[tuple[int, int, str]] = []  # accepted, sorted, not overlapping
        for kind in self.kinds:
            for s, e in DETECTORS[kind](text, self):
                i = bisect.bisect_right(starts, s)
                if (i and spans[i - 1][1] > s) or (i < len(spans) and spans[i][0] < e):
                    continue  # overlaps a match of an earlier kind (or an earlier match)
                starts.insert(i, s)
                spans.insert(i, (s, e, kind))
        if not spans:
            return text, {}
        names = dict(self.placeholders)
        out, pos, counts = [], 0, Counter[str]()
        for s, e, kind in spans:
            out += [text[pos:s], names[kind]]
            pos = e
            counts[kind] += 1
        out.append(text[pos:])
        return "".join(out), dict(counts)


@dataclass(kw_only=True)
class PiiRedact(Stage,
                name="pii_redact",
                description="replace e-mails, IP addresses, phone numbers and secrets by "
                            "typed placeholders",
                inputs={"documents": "documents"},
                output="documents"):
    """Replace personal data and secrets in every document by typed placeholders."""

    kinds: list[str] = field(default_factory=lambda: list(KINDS))  # detectors to run
    placeholders: dict[str, str] = field(default_factory=dict)  # kind -> text; else built-in
    entropy_threshold: float = 3.0  # assigned_secret: bits per character
    min_secret_length: int = 16  # assigned_secret: characters

    def check(self, problems: Problems) -> None:
        known = ", ".join(KINDS)
        problems.require(bool(self.kinds), "kinds", f"is empty; name detectors among {known}")
        for kind in self.kinds:
            problems.require(kind in KINDS, "kinds",
                             f"unknown kind {kind!r}{did_you_mean(kind, KINDS)}; known: {known}")
        for kind, text in self.placeholders.items():
            problems.require(kind in KINDS, "placeholders",
                             f"unknown kind {kind!r}{did_you_mean(kind, KINDS)}; known: {known}")
            problems.require(isinstance(text, str), "placeholders",
                             f"{kind}: the placeholder must be a string, got {text!r}")
        problems.require(self.entropy_threshold >= 0, "entropy_threshold",
                         f"{self.entropy_threshold} must be >= 0 (bits per character)")
        problems.require(self.min_secret_length >= 8, "min_secret_length",
                         f"{self.min_secret_length} must be >= 8")

    def redactor(self) -> Redactor:
        return Redactor(kinds=tuple(k for k in KINDS if k in self.kinds),
                        placeholders=tuple({**KINDS, **self.placeholders}.items()),
                        entropy_threshold=float(self.entropy_threshold),
                        min_secret_length=self.min_secret_length)

    def run(self, ctx: StageContext) -> None:
        redactor = self.redactor()
        parts = list_parts(ctx.inputs["documents"].path)
        tasks = []
        for i, part in enumerate(parts):
            key = task_key(i, file_stamp(part), self.version, self.params())
            tasks.append((key, {"part": str(part), "work": str(ctx.work), "key": key,
                                "redactor": redactor}))
        results = run_tasks(ctx, redact_part, tasks, "pii")

        clear_parts(ctx.output)
        place_parts(ctx.work, [r["files"][0] for r in results if r["documents_out"]],
                    ctx.output)
        for kind in redactor.kinds:  # every detector shows up, even when it found nothing
            ctx.count(f"pii.{kind}", 0)
        ctx.count("documents_changed", 0)
        for r in results:
            merge_counts(ctx, r["counts"])
        docs_in = sum(r["documents_in"] for r in results)
        docs_out = sum(r["documents_out"] for r in results)
        ctx.count("documents_in", docs_in)
        ctx.count("documents_out", docs_out)
        ctx.check_skips(docs_in)
        found = {k: ctx.counts[f"pii.{k}"] for k in redactor.kinds}
        ctx.log("replaced " + ", ".join(f"{n} {k}" for k, n in found.items()) +
                f" in {ctx.counts['documents_changed']} of {docs_in} documents")
        ctx.meta.update({"num_documents": docs_out,
                         "num_bytes": sum(r["bytes"] for r in results)})
        ctx.metrics.update({"documents_in": docs_in, "documents_out": docs_out,
                            "documents_changed": ctx.counts["documents_changed"],
                            "replacements": sum(found.values())})


def redact_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: redact one part into the scratch directory."""
    redactor: Redactor = task["redactor"]
    counts: Counter[str] = Counter()
    totals = {"in": 0, "out": 0, "bytes": 0}

    def redacted():
        for doc in read_documents(Path(task["part"])):
            totals["in"] += 1
            text = doc.get("text")
            if not isinstance(text, str):
                counts["skipped.missing_text"] += 1
                continue
            new, found = redactor.redact(text)
            if found:
                counts["documents_changed"] += 1
                for kind, n in found.items():
                    counts[f"pii.{kind}"] += n
                doc = {**doc, "text": new}
            totals["out"] += 1
            totals["bytes"] += len(new.encode("utf-8", "surrogatepass"))
            yield doc

    rel = f"pii/{task['key']}.jsonl.zst"
    (Path(task["work"]) / rel).parent.mkdir(parents=True, exist_ok=True)
    write_documents(Path(task["work"]) / rel, redacted())
    return {"files": [rel], "documents_in": totals["in"], "documents_out": totals["out"],
            "bytes": totals["bytes"], "counts": dict(counts)}


COMPONENTS: list[type] = [PiiRedact]

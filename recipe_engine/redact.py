"""Keeping credentials out of manifests, fingerprints, summaries and logs.

Two rules, applied to every parameter the store records and every line the CLI prints:

* A URL's user-info and query values are replaced: ``s3://AKIA...:secret@bucket/x?sig=abc``
  is recorded as ``s3://***@bucket/x?sig=***``. The stage itself receives the real value.
* A value a recipe takes from the environment (``${oc.env:NAME}``) is recorded as
  ``${oc.env:NAME}``, not as its value: the fingerprint does not change when a rotated
  token does, and the manifest never holds it. (A parameter whose *meaning* comes from the
  environment, a data path say, is therefore not fingerprinted by value: write it in the
  recipe or on the command line instead.)
"""
from __future__ import annotations

import re
from typing import Any

# scheme://[userinfo@]rest  -- userinfo is anything up to the first '@' before a '/'
_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@\s]+@)?([^\s?#'\"]*)(\?[^\s#'\"]*)?")
MASK = "***"
ENV_PLACEHOLDER = "\x00env:"  # what oc.env resolves to while the recorded form is built


def redact_text(text: str) -> str:
    """``text`` with user-info and query values of every URL in it masked."""
    if "://" not in text:
        return text

    def one(m: re.Match[str]) -> str:
        scheme, userinfo, rest, query = m.groups()
        out = scheme + (MASK + "@" if userinfo else "") + rest
        if query:
            pairs = [p.split("=", 1)[0] + ("=" + MASK if "=" in p else "")
                     for p in query[1:].split("&")]
            out += "?" + "&".join(pairs)
        return out

    return _URL.sub(one, text)


def redact(value: Any) -> Any:
    """``value`` (params: dicts, lists, strings) with every URL redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def recorded(real: Any, placeholder: Any) -> Any:
    """What the store records of ``real`` (resolved parameters, defaults filled): where
    ``placeholder`` (the same parameters resolved with environment variables as
    ``ENV_PLACEHOLDER`` markers) differs because of an environment variable, its
    ``${oc.env:NAME}`` reference; every URL redacted."""
    if isinstance(real, dict) and isinstance(placeholder, dict):
        return {k: recorded(v, placeholder.get(k, v)) for k, v in real.items()}
    if isinstance(real, list) and isinstance(placeholder, list) and len(real) == len(placeholder):
        return [recorded(r, p) for r, p in zip(real, placeholder)]
    if isinstance(placeholder, str) and ENV_PLACEHOLDER in placeholder and placeholder != real:
        return re.sub(re.escape(ENV_PLACEHOLDER) + r"([^\x00]*)\x00",
                      lambda m: "${oc.env:" + m.group(1) + "}", placeholder)
    return redact(real)

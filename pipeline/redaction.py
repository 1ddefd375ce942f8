"""Credentials never stored: a URI's user, password and signing or token parameters are removed
from everything this project records or prints (MLflow params and tags, manifests, run records,
checkpoints' configs, reports, log lines, what it hands to Ray). Credentials reach a run through
the environment (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, the AWS variables) or Kubernetes
Secrets.

URIs are split by hand, the same way for redacting and for taking the credentials out, rather
than by urllib.parse.urlsplit: urlsplit ends the authority at the first `?` or `#`, so a password
holding one would be read as a query or fragment and kept, and urlunsplit turns
sqlite:////abs/path into sqlite://abs/path. Here the user info is everything before the last `@`
ahead of the first `/`, whatever it holds (`;`, `,`, `'`, `#`, `?`, `:`): what a password may
hold is what is removed."""
import re
import urllib.parse
from typing import Any

REDACTED = "REDACTED"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Where a URI in free text ends: characters no URI holds unencoded, not even a mistyped password.
_END = re.compile(r"[\s\"<>`]")
# Query parameters that carry credentials in signed URLs (S3, GCS, Azure SAS) and token links.
_SECRET_PARAMETERS = re.compile(
    r"(?i)^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|awsaccesskeyid|signature"
    r"|sig|token|access_token|id_token|api[_-]?key|key|password|passwd|secret|client_secret|auth|authorization)$")


def _split(uri: str) -> tuple[str, str | None, str, str]:
    """(scheme://, user info or None, host, the rest from the first `/` on) of a URI."""
    scheme = _SCHEME.match(uri)
    rest = uri[scheme.end():]
    authority, slash, path = rest.partition("/")
    user_info, at, host = authority.rpartition("@")
    return scheme.group(0), user_info if at else None, host, slash + path


def _redact_parameter(parameter: str) -> str:
    name, equals, _ = parameter.partition("=")
    return f"{name}={REDACTED}" if equals and _SECRET_PARAMETERS.match(urllib.parse.unquote_plus(name)) else parameter


def _redact_uri(uri: str) -> str:
    scheme, user_info, host, rest = _split(uri)
    if user_info is None and "?" in host:  # no path: the query starts in the authority
        host, question, query = host.partition("?")
        rest = question + query + rest
    path, question, query = rest.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        query = "&".join(map(_redact_parameter, query.split("&"))) + hash_ + fragment
    # A URI inside this one's path or query (a redirect target) has credentials of its own.
    tail = redact(path + question + query)
    return f"{scheme}{'' if user_info is None else REDACTED + '@'}{host}{tail}"


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it replaced by REDACTED."""
    if "://" not in text:
        return text
    pieces, position = [], 0
    for scheme in _SCHEME.finditer(text):
        if scheme.start() < position:  # inside the URI just redacted
            continue
        end = _END.search(text, scheme.end())
        end = len(text) if end is None else end.start()
        pieces += [text[position:scheme.start()], _redact_uri(text[scheme.start():end])]
        position = end
    return "".join(pieces) + text[position:]


def redact_tree(value: Any) -> Any:
    """Plain data (dicts, lists, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(item) for item in value)
    return value


def credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without its user info, user, password) of a URI such as https://user:token@host."""
    if not _SCHEME.match(uri):
        return uri, None, None
    scheme, user_info, host, rest = _split(uri)
    if user_info is None:
        return uri, None, None
    user, _, password = user_info.partition(":")
    return f"{scheme}{host}{rest}", urllib.parse.unquote(user) or None, urllib.parse.unquote(password) or None

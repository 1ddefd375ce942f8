"""Credentials never stored: a URI's user, password and signing or token parameters are removed
from everything this project records or prints (MLflow params and tags, manifests, run records,
checkpoints' configs, reports, log lines). Credentials reach a run through the environment
(MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, the AWS variables) or Kubernetes Secrets."""
import re
import urllib.parse
from typing import Any

REDACTED = "REDACTED"
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>,;]+")
# Query parameters that carry credentials in signed URLs (S3, GCS, Azure SAS) and token links.
_SECRET_PARAMETERS = re.compile(
    r"(?i)^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|awsaccesskeyid|signature"
    r"|sig|token|access_token|id_token|api[_-]?key|key|password|passwd|secret|client_secret|auth|authorization)$")


def _redact_parameter(parameter: str) -> str:
    name, equals, _ = parameter.partition("=")
    return f"{name}={REDACTED}" if equals and _SECRET_PARAMETERS.match(urllib.parse.unquote(name)) else parameter


def _redact_uri(uri: str) -> str:
    # By hand rather than urlsplit/urlunsplit, which would turn sqlite:////abs/path into
    # sqlite://abs/path and fail on an odd port: only the credentials may change.
    scheme, _, rest = uri.partition("://")
    authority, tail = re.match(r"([^/?#]*)(.*)", rest, re.DOTALL).groups()
    if "@" in authority:
        authority = f"{REDACTED}@{authority.rpartition('@')[2]}"
    path, question, query = tail.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        query = "&".join(map(_redact_parameter, query.split("&"))) + hash_ + fragment
    return f"{scheme}://{authority}{path}{question}{query}"


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it replaced by REDACTED."""
    return _URI.sub(lambda match: _redact_uri(match.group(0)), text) if "://" in text else text


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
    scheme, separator, rest = uri.partition("://")
    authority, tail = re.match(r"([^/?#]*)(.*)", rest, re.DOTALL).groups()
    if not separator or "@" not in authority:
        return uri, None, None
    user_info, _, host = authority.rpartition("@")
    user, _, password = user_info.partition(":")
    return f"{scheme}://{host}{tail}", urllib.parse.unquote(user) or None, urllib.parse.unquote(password) or None

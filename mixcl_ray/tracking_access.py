"""Who may reach the tracking server, and how: credentials kept out of URIs, logs and plain
http, and a server checked before any compute. Used by ``tracking``; knows no runs."""

from __future__ import annotations

import os


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(URI without user:password, user, password) of an http(s) tracking URI."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, None, None
    host = parts.netloc.rsplit("@", 1)[1]
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    password = unquote(parts.password) if parts.password is not None else None
    return clean, unquote(parts.username or ""), password


def set_credentials(uri: str) -> str:
    """``uri`` without its credentials, which move to MLflow's own environment variables (basic
    auth), so that MLflow never prints or stores them as part of a URL."""
    clean, user, password = split_credentials(uri)
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return clean


def with_env_credentials(uri: str) -> str:
    """``uri`` carrying this process's ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` when it has
    no credentials of its own: for the trials and Train controllers of a fit, which may run on
    nodes that do not share this environment (it reaches them through the object store, never
    a log or Tune's state; ``set_credentials`` moves it aside again there)."""
    from urllib.parse import quote, urlsplit, urlunsplit

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not user or not uri.startswith(("http://", "https://")) or split_credentials(uri)[1]:
        return uri
    auth = quote(user, safe="")
    if "MLFLOW_TRACKING_PASSWORD" in os.environ:
        auth += ":" + quote(os.environ["MLFLOW_TRACKING_PASSWORD"], safe="")
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=f"{auth}@{parts.netloc}"))


LOOPBACK = ("127.0.0.1", "localhost", "::1")
ALLOW_HTTP_ENV = "MIXCL_ALLOW_HTTP_CREDENTIALS"


def refuse_clear_credentials(uri: str) -> None:
    """Refuse to send a password over plain http to another machine (basic auth sends it with
    every request); ``MIXCL_ALLOW_HTTP_CREDENTIALS=1`` allows it on a network you trust."""
    from urllib.parse import urlsplit

    clean, user, _ = split_credentials(uri)
    user = user or os.environ.get("MLFLOW_TRACKING_USERNAME")
    host = urlsplit(clean).hostname
    if clean.startswith("http://") and user and host not in LOOPBACK:
        if os.environ.get(ALLOW_HTTP_ENV) != "1":
            raise ValueError(
                f"refusing to send MLflow credentials over plain http to {safe_uri(uri)}: use "
                "https:// (the server behind a TLS proxy, docs/cluster.md), or set "
                f"{ALLOW_HTTP_ENV}=1 on a network you trust"
            )


def health(uri: str, timeout: float = 10) -> None:
    """Ask an http(s) tracking server's /health once; raises OSError when it does not answer."""
    import base64
    import urllib.request

    clean, user, password = split_credentials(uri)
    request = urllib.request.Request(f"{clean.rstrip('/')}/health")
    if user:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    urllib.request.urlopen(request, timeout=timeout).close()


def check_reachable(uri: str) -> None:
    """Fail before any compute when the tracking server cannot be reached (or would receive a
    password in clear)."""
    refuse_clear_credentials(uri)
    if uri.startswith(("http://", "https://")):
        try:
            health(uri)
        except OSError as err:
            raise ConnectionError(
                f"MLflow tracking server {safe_uri(uri)} is not reachable ({err}); start it or "
                "point --tracking-uri / MLFLOW_TRACKING_URI elsewhere"
            ) from None
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri=set_credentials(uri)).search_experiments(max_results=1)
    except Exception as err:  # MLflow raises several types for an unreachable server
        raise ConnectionError(
            f"MLflow tracking at {safe_uri(uri)} is not reachable: {type(err).__name__}: "
            f"{str(err)[:200]}"
        ) from None


def safe_uri(uri: str) -> str:
    """The URI without user:password (also for database URIs such as postgresql://u:p@host/db)."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return uri

"""The MLflow tracking server, asked once before anything starts: a stopped server is one sentence.

Only ``urllib``: ``flywheel run`` probes the server before it loads MLflow, Prefect or a model library.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from alignment.errors import UserError

PROBE_TIMEOUT_S = 10.0


class TrackingUnreachable(UserError):
    """The recipe's MLflow tracking server does not answer."""


def check_tracking(uri: str) -> None:
    """Raise ``TrackingUnreachable`` (one sentence, within ``PROBE_TIMEOUT_S``) if an HTTP tracking server is down.

    Any HTTP answer counts as reachable (a proxy's 401 is the server's business); only a refused
    connection, a timeout or an unknown host fail. Local URIs (SQLite, files) are not probed.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnreachable(
            f"The MLflow tracking server at {uri} cannot be reached ({reason}): start it "
            "(flywheel stack up) or set mlflow.tracking_uri to a running server."
        ) from None

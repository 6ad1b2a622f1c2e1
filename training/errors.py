"""What our programs say when the input is wrong.

A mistyped flag, a dataset with the wrong columns or a model name that cannot be downloaded
is the user's to fix, not a bug: it gets one clear paragraph and exit code 2, never a traceback.
"""

import os
import socket
import sys
from contextlib import contextmanager
from urllib.parse import urlparse


class UsageError(Exception):
    """Bad input (flags, data, paths). The message says what is wrong and how to fix it."""


class RunFailed(Exception):
    """A run that cannot go on (a full disk, a diverged loss): the message says what failed, where,
    and what was kept. Exit code 1."""


def require(condition, message):
    """The checks of flags, data and paths read as what must hold: require(x >= 1, "--x must be ...")."""
    if not condition:
        raise UsageError(message)


@contextmanager
def exit_on_usage_error():
    """Turn a UsageError into `error: <message>` on stderr and exit code 2; a RunFailed the same way,
    with exit code 1."""
    try:
        yield
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


def hub_is_reachable(endpoint=None, timeout=3.0):
    """True when a TCP connection to the Hugging Face Hub opens within `timeout` seconds.

    The Hub clients retry for up to a minute before giving up; one socket probe answers in
    milliseconds on a machine without network (DNS fails at once) and within `timeout` otherwise.
    """
    if endpoint is None:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_local_or_reachable(name, flag, what, endpoint=None):
    """Fail fast when `name` is neither a local path nor downloadable from a reachable Hub.

    `HF_HUB_OFFLINE=1` means the user wants cached copies: then the libraries answer from the cache
    themselves, quickly, and we do not probe.
    """
    if os.path.exists(name) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return
    if hub_is_reachable(endpoint):
        return
    raise UsageError(
        f"{flag} {name!r} is not a local path and the Hugging Face Hub cannot be reached from this "
        f"machine, so the {what} cannot be downloaded. Pass a local copy instead, e.g. "
        f"{flag} ../shared/{'models/minilm-l6' if what == 'model' else 'data/imdb'}, or, if the "
        f"{what} was downloaded before, set HF_HUB_OFFLINE=1 to use the cached copy."
    )

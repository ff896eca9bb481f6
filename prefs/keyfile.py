"""The signing key generated once into the instance folder when ``PREFS_SECRET_KEYS`` is not set."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

KEY_FILE = "secret_keys"
log = logging.getLogger("prefs.config")


class KeyFileError(Exception):
    """The key file cannot be read or written; the message says what to do."""


def generated_key(instance_path: str) -> str:
    """Return the key generated into the instance folder, generating it on first use."""
    path = Path(instance_path) / KEY_FILE
    key = stored_key(path)
    if key is not None:
        return key
    key = secrets.token_urlsafe(32)
    # written whole under a name of this process's, then linked into place: workers
    # starting together agree on the first key linked, and none reads half of one
    fresh = path.with_name(f".{KEY_FILE}.{os.getpid()}")
    try:
        os.makedirs(instance_path, exist_ok=True)
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(fresh, path)
    except FileExistsError:
        stored = stored_key(path)
        assert stored is not None
        return stored
    except OSError as err:
        problem = f"is not set, and no key could be written to {path} ({err.strerror})"
        raise KeyFileError(problem + ": set it, or free room there") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(fresh)
    log.warning("PREFS_SECRET_KEYS is not set: generated a signing key in %s", path)
    return key


def stored_key(path: Path) -> str | None:
    """Return the key generated earlier into ``path``, None if there is none."""
    try:
        key = path.read_text().strip().split(",")[-1].strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise KeyFileError(f"is not set, and {path} cannot be read ({err.strerror})") from None
    if len(key) < 16:
        # a write cut short (an older version's, on a full disk): never sign with what is left
        problem = f"is not set, and {path} holds no whole key: delete the file, or set the keys"
        raise KeyFileError(problem)
    return key

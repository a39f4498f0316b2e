"""Key files: 32 random bytes, owner-only permissions.

    kvshield keygen --out /etc/kvshield.key     # mode 0600
"""

import os
import stat

from .config import ShieldConfigError
from .transforms import KEY_BYTES, new_key


def write_key_file(path: str) -> None:
    """Create a new key file with mode 0600; refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(new_key())


def read_key_file(path: str) -> bytes:
    """The key in a key file, after checking that it is private and the right size."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ShieldConfigError(f"kvshield: key_file {path!r} does not exist") from None
    except OSError as e:
        raise ShieldConfigError(f"kvshield: key_file {path!r} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ShieldConfigError(f"kvshield: key_file {path!r} is not a regular file")
    if st.st_mode & 0o077:
        raise ShieldConfigError(
            f"kvshield: key_file {path!r} has mode {stat.S_IMODE(st.st_mode):04o}; "
            f"it must not be readable by group or others (chmod 600)"
        )
    if st.st_size != KEY_BYTES:
        raise ShieldConfigError(f"kvshield: key_file {path!r} holds {st.st_size} bytes; a key is exactly {KEY_BYTES}")
    try:
        with open(path, "rb") as f:
            key = f.read()
    except OSError as e:
        raise ShieldConfigError(f"kvshield: key_file {path!r} cannot be read: {e.strerror}") from None
    if len(key) != KEY_BYTES:
        raise ShieldConfigError(f"kvshield: key_file {path!r} holds {len(key)} bytes; a key is exactly {KEY_BYTES}")
    return key

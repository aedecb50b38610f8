"""Number formats shared by the report tables and plot captions, and staged file writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from hybridlm.trace.store import make_parent_dirs


def us(x: float | None) -> str:
    """Microseconds with as many digits as a duration needs."""
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}x" if x >= 100 else f"{x:.2f}x"


def share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def change(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0%}"


def wall(microseconds: float | None) -> str:
    if microseconds is None:
        return "unknown"
    return f"{microseconds / 1e6:,.2f} s" if microseconds >= 1e6 else f"{microseconds / 1e3:,.1f} ms"


def write_staged(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(staging_path)`` for a file beside ``path``, then move it onto ``path``: a failed
    or interrupted write never leaves a half-written file where the user's was. Returns ``path``."""
    path = Path(path)
    make_parent_dirs(path)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        write(Path(staging))
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the user's usual mode
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

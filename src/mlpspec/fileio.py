"""Writes that never leave half a file: everything goes to a scratch path beside the
target and is renamed into place only when complete, so a kill at any moment leaves the
old version or the new one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def atomic_write(target: str | Path, write) -> None:
    """Call write(path) on a scratch file beside `target` (same suffix, so writers that
    append one, like numpy's, keep it), then rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp (and some writers) make it private; it should read like any other
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(final: str | Path):
    """Yield a scratch folder beside `final`; rename it into place only if the body
    finishes. An exception (or a kill) never leaves a half-written `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder should read like any other
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # anything but "another process finished first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def keyed_file(folder: str | Path, identity: dict) -> Path:
    """The JSON file in `folder` kept for `identity` (what the kept figures depend on): named
    by a hash of it, so a change in any of it reads as a new file."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(folder) / f"{key}.json"

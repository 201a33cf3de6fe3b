"""Files the package writes: whole or not at all, and readable as the umask says.

``atomic_path`` gives a temporary path in the target's folder and renames it over the target once the block
succeeds: a failure (a full disk, an interrupt) leaves no partial file and any previous one as it was. Files
get ``0o666 & ~umask``, as ``cp`` gives them: ``tempfile.mkstemp`` and safetensors create files 0600, which
another user (or a container) could not read. ``follow_umask`` fixes a file a library wrote in place.
"""
import contextlib
import os
import stat
import uuid
from pathlib import Path
from typing import Iterator, Union

__all__ = ['atomic_path', 'follow_umask']


def _create(path: Path) -> int:
    """Create the empty file ``path`` (never an existing one) and return its permission bits."""
    # Mode 0o666 at creation: the kernel applies the umask, as for cp; reading os.umask means setting it,
    # which races other threads.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return stat.S_IMODE(path.stat().st_mode)


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f'.{path.name}.{uuid.uuid4().hex[:12]}{suffix}')


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """A new empty file beside ``path`` to write (by name, so libraries can too), renamed over ``path`` at the end.

    If the block raises, the temporary file goes and ``path`` stays as it was; an OSError that names no file (a
    write on a full disk) is raised again naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, '.tmp')
    mode = _create(tmp)
    try:
        yield tmp
        os.chmod(tmp, mode)  # a library may have replaced the file with a 0600 one of its own
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())  # on disk before it is renamed in: a crash leaves the old file, not an empty one
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise OSError(e.errno, f'{e.strerror or os.strerror(e.errno)} (left as it was)', str(path)) from None
        raise


def follow_umask(path: Union[str, Path]) -> None:
    """Give ``path`` (a file a library wrote) the permissions a new file in its folder gets."""
    path = Path(path)
    probe = _sibling(path, '.mode')
    try:
        os.chmod(path, _create(probe))
    finally:
        probe.unlink(missing_ok=True)

"""Files: written so that an interruption never leaves a half-written one, and read
with an error that names the file.

`atomic_write` replaces one file: readers see the old file or the whole new one.
`atomic_directory` replaces a whole directory the same way: the new contents are
written to a temporary directory beside it, which then takes its place (on Linux by an
atomic exchange of the two; elsewhere by two renames with Ctrl-C held off between
them). Whatever fails, and wherever an interruption lands, the old file or directory
is still there and no temporary file is left behind.

`read_mapping` reads a JSON object or a YAML mapping, raising the caller's error type
for a missing, unreadable, malformed or non-mapping file.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from tl_transcoders.core.errors import TranscodersError

__all__ = ["OutputPathError", "atomic_directory", "atomic_write", "check_writable_directory", "read_mapping"]


class OutputPathError(TranscodersError, OSError):
    """A file or directory cannot be written where asked: the path is a file where a
    directory is needed (or the reverse), or it is not writable."""


def _unwritable(path: Path, err: OSError) -> OutputPathError:
    reason = err.strerror or str(err)
    return OutputPathError(f"cannot write {path}: {reason}; choose a path in a directory you can write to")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call `write(temporary_path)` on a temporary file beside `path` (its directory made
    if needed), then rename it to `path`: readers see the old file or the whole new one,
    never a part. The temporary file is removed if `write` fails; the new file gets a
    normal file mode (the umask's). `OutputPathError` where `path` is a directory or
    cannot be written."""
    path = Path(path)
    try:
        if path.is_dir():
            raise OutputPathError(f"cannot write {path}: it is a directory; give the path of a file")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OutputPathError:
        raise
    except OSError as err:  # a name too long, a parent that is a file, no permission
        raise _unwritable(path, err) from err
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, TranscodersError):
            raise _unwritable(path, err) from err
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; when the block ends normally it
    becomes `path`, replacing any directory there as a whole. On an exception (Ctrl-C
    included) the temporary directory is removed and `path` is left as it was.
    `OutputPathError` where `path` is a file or its directory cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"cannot write {path}: it exists and is not a directory; give a directory path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as err:
        raise _unwritable(path, err) from err
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable_directory(path: str | os.PathLike) -> Path:
    """Create `path` (and its parents) if needed and check that a file can be written in
    it; raise `OutputPathError` (an `OSError`, naming the path) if not. Returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"cannot write into {path}: it exists and is not a directory; give a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check.", delete=True):
            pass
    except OSError as err:
        raise _unwritable(path, err) from err
    return path


def _move_into_place(new: Path, path: Path) -> None:
    """Make directory `new` be `path`; an existing `path` is replaced and removed."""
    if not path.exists():
        os.rename(new, path)
        return
    if _exchange(new, path):  # `new` now holds the old contents
        shutil.rmtree(new, ignore_errors=True)
        return
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    with _interrupts_deferred():
        os.rename(path, old)
        os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    system or file system cannot."""
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold off Ctrl-C (SIGINT) for the block; one that arrived is raised after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def _umask() -> int:
    """The process's file-creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_mapping(
    path: str | os.PathLike, error: type[TranscodersError], language: Literal["JSON", "YAML"] = "JSON"
) -> dict[str, Any]:
    """The JSON object (or YAML mapping) in the file at `path`; `error`, naming the file,
    when it is missing or unreadable, not valid `language`, or holds another value."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    if language == "YAML":
        import yaml

        parse, invalid, container = yaml.safe_load, (yaml.YAMLError,), "mapping"
    else:
        parse, invalid, container = json.loads, (json.JSONDecodeError,), "object"
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise error(f"{path}: cannot read it ({err})") from err
    except (*invalid, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid {language} ({err})") from err
    if not isinstance(data, dict):
        raise error(f"{path}: expected a {language} {container}, got {type(data).__name__}")
    return data

"""The one atomic writer: single files and whole result folders appear complete or not at all.

* :func:`atomic_path` — a temporary name beside the target (same folder, same suffix), renamed onto it when the
  caller's writing succeeded; removed on any exit otherwise (errors, Ctrl-C, SIGTERM turned into an exception).
* :func:`result_folder` — a results folder is one unit: the new set is built in a hidden sibling folder and then
  swapped with the old folder in one step (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames with
  signals held back between them), so a reader finds either the complete new set or the complete old one, never a
  mix. The old set is deleted after the swap.
* :func:`check_output_folder` / :func:`check_output_file` — validate an output path before any computation.

Files get the user's umask (``mkstemp`` alone would make them private, 0600).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from ..errors import UserError

#: Files each kind of results folder may hold: what register and demo write ("registration") and what evaluate
#: writes ("evaluation"). A folder holding anything else, or files of the other kind, is not a results folder of
#: that kind and is never replaced by it (a registration into an evaluation folder would delete hours of work).
RESULT_SET_KINDS = {
    "registration": ("transform.h5", "inverse.h5", "warped.nii.gz", "jacobian.nii.gz", "ic_error.nii.gz",
                     "metrics.json", "report.png", "demo.json"),
    "evaluation": ("evaluation.json", "evaluation.md"),
}
#: Every file name a results folder of any kind may hold.
RESULT_SET_FILES = tuple(name for names in RESULT_SET_KINDS.values() for name in names)


def _umask() -> int:
    """The process's umask, read from /proc where possible (setting it, the only portable way to read it, would
    briefly change it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from the user's umask (0o666 & ~umask)."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode a new folder gets from the user's umask (0o777 & ~umask)."""
    return 0o777 & ~_umask()


def file_suffix(path: Path) -> str:
    """The suffix of a file name as written (``.nii.gz`` and ``.tar.gz`` count as one)."""
    name = path.name.lower()
    for double in (".nii.gz", ".tar.gz"):
        if name.endswith(double):
            return path.name[-len(double):]
    return path.suffix


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same suffix; rename it onto ``path`` on success (with the
    user's umask). On failure nothing is left: the temporary file and any companion data file (``.raw`` of an
    ``.mhd``) are removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = file_suffix(path)
        stem = path.name[:len(path.name) - len(suffix)] if suffix else path.name
        handle, temporary = tempfile.mkstemp(prefix=f".{stem or 'out'}.", suffix=suffix, dir=path.parent)
    except OSError as error:
        raise _os_error_as_user_error(error, path) from None
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.chmod(temporary_path, file_mode())
        os.replace(temporary_path, path)
    except OSError as error:
        raise _os_error_as_user_error(error, path) from None
    except RuntimeError as error:  # SimpleITK / ITK writers report OS errors as RuntimeError text
        _remove_temporary(temporary_path)
        code = _os_error_in_text(str(error))
        if code is None and _nearly_full(path.parent):  # ITK's HDF5 writer says only "H5Dwrite failed"
            code = errno.ENOSPC
        if code is None:
            raise
        raise _os_error_as_user_error(OSError(code, os.strerror(code)), path) from None
    finally:
        _remove_temporary(temporary_path)


def _remove_temporary(temporary_path: Path) -> None:
    temporary_path.unlink(missing_ok=True)
    for companion in (".raw", ".zraw", ".raw.gz"):  # .mhd/.nhdr writers put the voxels in a second file
        temporary_path.with_suffix(companion).unlink(missing_ok=True)


_NEARLY_FULL_BYTES = 16 << 20


def _nearly_full(folder: Path) -> bool:
    """Whether the file system of ``folder`` has less than 16 MB free (after a failed write was removed)."""
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _os_error_as_user_error(error: OSError, path: Path) -> UserError:
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"Could not write '{path}': the disk is full ({reason}). Free some space and run again; "
                         "the previous files were left as they were.")
    return UserError(f"Could not write '{path}' ({reason}). Choose a folder you can write to.")


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM)


def _os_error_in_text(text: str) -> "int | None":
    """The errno whose message (``strerror``) a library's error text quotes, for write failures."""
    for code in _WRITE_ERRNOS:
        if os.strerror(code) in text:
            return code
    return None


def check_output_file(path: str | Path, option: str = "--out", suffixes: tuple[str, ...] = ()) -> Path:
    """Validate an output file path before any work: not empty, not a folder, one of ``suffixes`` (when given),
    in a folder that exists or can be made and that is writable."""
    if path is None or str(path).strip() == "":
        raise UserError(f"{option} is empty; give a file name.")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} '{path}' is a folder; give a file name.")
    if suffixes and not path.name.lower().endswith(tuple(suffixes)):
        raise UserError(f"{option} '{path.name}': unknown file type; use one of {', '.join(suffixes)}.")
    _check_writable_folder(path.parent if str(path.parent) else Path("."), option)
    return path


def check_output_folder(path: str | Path, option: str = "--out", kind: str = "registration") -> Path:
    """Validate a results folder before any work: not empty, not an existing file, not the current folder (nor
    '.', '..' or the root: a folder is replaced by renaming, which these names cannot be), new or empty or an
    earlier results folder of the same ``kind`` (only its :data:`RESULT_SET_KINDS` files), and its parent
    writable."""
    if path is None or str(path).strip() == "":
        raise UserError(f"{option} is empty; give a folder name.")
    path = Path(path)
    if path.name in ("", ".", "..") or _is_current_folder(path):
        raise UserError(f"{option} '{path}' is the current folder, its parent or the root; results replace the "
                        "whole folder, so give the name of a new folder, e.g. 'result'.")
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} '{path}' is an existing file, not a folder.")
    if path.is_dir():
        foreign = sorted(p.name for p in path.iterdir() if p.name not in RESULT_SET_KINDS[kind])
        if foreign:
            raise UserError(f"{option} '{path}' holds files that are not {kind} results "
                            f"({', '.join(foreign[:3])}{'…' if len(foreign) > 3 else ''}); results replace the "
                            "whole folder, so choose a new or empty folder.")
    _check_writable_folder(path.parent, option)
    return path


def _is_current_folder(path: Path) -> bool:
    try:
        return path.resolve() == Path.cwd().resolve()
    except OSError:  # the current folder was deleted
        return False


def _check_writable_folder(folder: Path, option: str) -> None:
    existing = folder.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option}: '{existing}' is a file, so '{folder}' cannot be created.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option}: the folder '{existing}' is not writable.")


_RENAME_EXCHANGE = 2
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    global _libc
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EPERM):  # old kernel or file system without the flag
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Defer SIGINT and SIGTERM for the few system calls of a swap: their Python handlers only record them, and a
    recorded signal is delivered again once the swap is done. (Blocking with ``pthread_sigmask`` would not be
    enough: the kernel may deliver the signal to another thread, torch's, and Python still runs the handler in
    the main thread.) Outside the main thread, where handlers cannot be set, nothing is deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in received[:1]:
            signal.raise_signal(signum)


@contextlib.contextmanager
def result_folder(path: str | Path, kind: str = "registration") -> Iterator[Path]:
    """Yield a new hidden sibling folder of ``path`` to write a complete result set into; on success it replaces
    ``path`` in one step (see the module docstring); on any failure it is removed and ``path`` is untouched.
    ``kind``: which results the folder holds (:data:`RESULT_SET_KINDS`). A symbolic link to a folder stays a link:
    the folder it points to is replaced."""
    path = check_output_folder(path, kind=kind)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    except OSError as error:
        raise _os_error_as_user_error(error, path) from None
    retired = None
    try:
        yield staging
        os.chmod(staging, folder_mode())
        with _signals_deferred():
            if path.exists():
                if _exchange(staging, path):
                    retired = staging  # now holds the old set
                else:
                    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                    os.rmdir(aside)
                    os.replace(path, aside)
                    try:
                        os.replace(staging, path)
                    except BaseException:
                        os.replace(aside, path)  # the old set goes back before anything else happens
                        raise
                    retired = aside
            else:
                os.replace(staging, path)
    except OSError as error:
        raise _os_error_as_user_error(error, path) from None
    finally:
        if staging.exists() and staging != retired:
            shutil.rmtree(staging, ignore_errors=True)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)

"""Atomic file operations: a checkpoint folder or a progress file is either the old one or the new one, complete.

Folders are written beside their target under a temporary name, flushed to disk, and moved into place in one rename
(or one atomic exchange where Linux offers it); what a killed process leaves behind is recognised by its name and
tidied by the next write of the same target. Nothing here knows what a model is.
"""

from __future__ import annotations

import ctypes
import glob
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ._faults import fault_point

logger = logging.getLogger(__name__)

__all__ = [
    "RETIRED_PREFIX",
    "STAGING_PREFIX",
    "clean_interrupted_writes",
    "fsync_directory",
    "fsync_file",
    "prepare_output_directory",
    "write_directory_atomically",
    "write_json_atomically",
]


STAGING_PREFIX = ".olica-tmp-"  # a directory being written; never a valid checkpoint until renamed
RETIRED_PREFIX = ".olica-old-"  # the previous target, moved aside while the new one takes its place


def prepare_output_directory(save_directory: str | os.PathLike, overwrite: bool) -> Path:
    """Check the target before any work is done, so a bad path fails in seconds, not after pruning.

    Also tidies what an interrupted earlier write of the same target left beside it (see
    ``clean_interrupted_writes``).
    """
    target = Path(save_directory).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Output path {target} exists and is a file; choose a directory path.")
    parent = target.parent
    existing = next((path for path in (parent, *parent.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise NotADirectoryError(f"Output path {target} is inside {existing}, which is a file; choose a directory path.")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise PermissionError(
            f"Cannot create the parent folder {parent} of the output directory (permission denied); choose a "
            "writable output directory."
        ) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write to {parent}; choose a writable output directory.")
    clean_interrupted_writes(target)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output directory {target} is not empty; choose another path or pass overwrite=True (--overwrite)."
        )
    return target


def _owner_is_gone(path: Path, prefix: str, target: Path) -> bool:
    """Whether the process that made a staging/retired folder of ``target`` (named ``<prefix><target>-<pid>-<random>``)
    no longer runs. False for a folder of another target whose name merely starts like this one (``out-2``)."""
    # mkdtemp's random suffix has no '-', so the pid is the last-but-one field after the exact target name.
    match = re.fullmatch(r"(\d+)-[A-Za-z0-9_]+", path.name[len(prefix) + len(target.name) + 1 :])
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False  # ours: a write of this process cleans up after itself
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def clean_interrupted_writes(target: str | os.PathLike) -> None:
    """Remove the staging folders of writes of ``target`` whose process died (a kill, a crash, a power loss), and
    put back a previous ``target`` that such a write had moved aside but not yet replaced."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = glob.escape(target.name)
    for retired in sorted(target.parent.glob(f"{RETIRED_PREFIX}{pattern}-*")):
        if not _owner_is_gone(retired, RETIRED_PREFIX, target):
            continue
        previous = retired / target.name
        if previous.is_dir() and not target.exists():
            os.replace(previous, target)
            logger.warning("Restored %s, which an interrupted write had moved aside.", target)
        shutil.rmtree(retired, ignore_errors=True)
    for staging in target.parent.glob(f"{STAGING_PREFIX}{pattern}-*"):
        if _owner_is_gone(staging, STAGING_PREFIX, target):
            shutil.rmtree(staging, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_current_directory, rename_exchange = -100, 2
    return renameat2(at_current_directory, os.fsencode(first), at_current_directory, os.fsencode(second),
                     rename_exchange) == 0


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's contents to disk (a rename after this publishes complete data)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a folder's entries to disk, so a rename or a new file in it survives a power loss."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    """Flush every file and folder under ``directory`` to disk, so the rename publishes complete files."""
    if os.name != "posix":
        return
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_directory(root)


def write_json_atomically(path: Path, value, temporary_prefix: str = STAGING_PREFIX) -> None:
    """Replace ``path`` by the JSON of ``value`` in one rename: a reader sees the old file or the new one, whole."""
    temporary = path.with_name(f"{temporary_prefix}{path.name}")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


def write_directory_atomically(
    save_directory: str | os.PathLike, write, overwrite: bool = False, verify=None
) -> Path:
    """Run ``write(tmp_dir)`` in a temporary directory beside the target, verify it, then move it into place.

    The temporary directory is named ``.olica-tmp-<target>-<pid>-<random>``; if this process is killed, the next
    write of the same target removes it. A crash, a full disk, an exception inside ``write`` or a failed ``verify``
    leaves the target as it was; an existing non-empty target is replaced only with ``overwrite=True``, and only
    once the new directory is complete (in one atomic exchange where the OS offers it).

    Args:
        save_directory: the target directory.
        write: ``write(staging: Path)`` fills the staging directory.
        overwrite: replace an existing non-empty target.
        verify: ``verify(staging: Path)`` raises if the staging directory is not a complete checkpoint.
    """
    target = prepare_output_directory(save_directory, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-{os.getpid()}-", dir=target.parent))
    try:
        write(staging)
        fault_point("output_written")
        if verify is not None:
            verify(staging)
        _fsync_tree(staging)
        fault_point("output_before_rename")
        if target.exists() and _exchange(staging, target):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the previous target
        elif target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f"{RETIRED_PREFIX}{target.name}-{os.getpid()}-", dir=target.parent))
            os.replace(target, retired / target.name)
            try:
                fault_point("output_between_renames")
                os.replace(staging, target)
            except BaseException:
                os.replace(retired / target.name, target)
                shutil.rmtree(retired, ignore_errors=True)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target

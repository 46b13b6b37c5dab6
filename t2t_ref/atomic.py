"""Files written whole or not at all, and the leftovers of writes that were killed.

write_atomic writes a temporary file in the target's folder, flushes it to disk, then renames
it over the target: a kill at any moment leaves either the old file or the new one, never half
of one. What a kill can leave is the temporary file itself; its name says whose it is
(.tmp-t2t_ref-<pid>-<random>-<target>), and remove_leftovers deletes such files when a run
starts again in that folder. The file gets the permissions any new file gets (0666 less the
umask, as open() gives, usually 0644), not mkstemp's 0600.
"""

import os
import re
import secrets
import tempfile

PREFIX = ".tmp-t2t_ref-"
# temp files of interrupted writes: ours, older t2t_ref's (mkstemp's .tmp-XXXXXXXX.safetensors)
# and the safetensors library's own (.tmpXXXXXX), which older versions wrote through
LEFTOVER = re.compile(rf"{re.escape(PREFIX)}.*|\.tmp-[A-Za-z0-9_]{{8}}\.safetensors"
                      r"|\.tmp[A-Za-z0-9]{6}")


def write_atomic(path, data):
    """Write bytes (or str, as UTF-8) to path via a temporary file, fsync and rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"
                               f"{os.path.basename(path)}")
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_leftovers(folder):
    """Delete the temporary files interrupted writes left in folder; returns their names."""
    if not os.path.isdir(folder):
        return []
    names = sorted(name for name in os.listdir(folder) if LEFTOVER.fullmatch(name)
                   and os.path.isfile(os.path.join(folder, name)))
    for name in names:
        os.remove(os.path.join(folder, name))
    return names


# ---- before a long job: can its output be written at all? -------------------------------------

def nearest_existing(path):
    """path itself if it exists, else its nearest ancestor that does (absolute)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def cannot_write_in(folder):
    """None if a file can be made in folder (probed with a temporary file, removed at once),
    else the reason ("Permission denied", "Read-only file system", ...)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def file_path_problem(path):
    """Why a file could not be written at path, for a message that names the path first: its
    folder lies under a file, does not exist (no folders are made for it), or cannot be
    written in; None if it can be."""
    folder = os.path.dirname(os.path.abspath(path))
    existing = nearest_existing(folder)
    if not os.path.isdir(existing):
        return f"lies under {existing}, which is a file"
    if existing != folder:
        return f"folder {folder} does not exist: create it"
    reason = cannot_write_in(folder)
    if reason is not None:
        return f"cannot write in {folder} ({reason})"
    return None


def folder_path_problem(path):
    """Why path could not be (or become) a folder to write in, as words to follow the path:
    it is a file, lies under a file, or its nearest folder cannot be written in; None if it
    can. Creates nothing."""
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(path) else \
            f"lies under {existing}, which is a file"
        return f"{where}: choose a folder path"
    reason = cannot_write_in(existing)
    if reason is not None:
        return f"cannot write in {existing} ({reason}): choose a folder you can write to"
    return None

"""Writing outputs: nothing of the user's is touched, nothing half-written is left, and what is written is readable
as the umask says.

- Output folders (`staged`) are built under a fresh name beside the destination and renamed into place; a destination
  folder is replaced only if this tool wrote it (its `.p2p` marker), never one holding other files.
- Output files (`staged_file`) are written to a temporary file created exclusively (a new random name, never an
  existing file or a link) in the destination's folder, then renamed over the destination, which is replaced only
  if this tool wrote it (`owned`: an inversion file's metadata, a picture's "Software" text) and never followed if it
  is a link. A missing parent folder is created; an unwritable one is refused before any work.
- On failure, Ctrl-C or SIGTERM the temporary file or folder is removed (the commands turn SIGTERM into the same
  unwinding as Ctrl-C: `terminate_like_interrupt`).
- Folders and files end with the permissions a plain `mkdir` / `open` would give under the process's umask
  (temporary files start private: 0700 / 0600).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import InputError

MARKER = ".p2p"  # in every output folder this tool writes: such a folder may be replaced whole by the next run
SOFTWARE = "prompt2prompt"  # the "Software" text of every PNG this tool writes


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so the same clean-up runs (exit status 143)."""


def terminate_like_interrupt() -> None:
    """From now on SIGTERM unwinds like Ctrl-C (temporary files and folders removed); main thread only."""
    def handler(signum, frame):
        raise Terminated()

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a test runner's worker): leave the default
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(path: Path) -> None:
    """Give a file or folder made private by tempfile the permissions the umask gives new ones."""
    mode = (0o777 if path.is_dir() else 0o666) & ~_umask()
    os.chmod(path, mode)


PROBE = ".p2p-probe-"  # a writability probe, made and removed at once (another process may see one meanwhile)


def _check_writable(folder: Path, asked: Path) -> None:
    """The folder (or, if it does not exist yet, its nearest existing ancestor) accepts a new file."""
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise InputError(f"cannot write {asked}: {probe} is a broken link")
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot write {asked}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=PROBE, dir=probe)
    except OSError as e:
        raise InputError(f"cannot write {asked}: {probe} does not accept new files ({e.strerror})") from None
    os.close(fd)
    os.unlink(name)


def check_output_folder(out: str | Path) -> Path:
    """Refuse, before any work, an output folder that cannot be written: a file, a link, a path under a file, a place
    without write permission, or an existing folder with files this tool did not write (those are never deleted)."""
    out = Path(out).expanduser()
    if out.is_symlink():
        raise InputError(f"--out {out} is a link; expected a folder of its own (new, empty, or written by p2p)")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; expected a folder to write into (new, empty, or written by p2p)")
    if out.is_dir():
        if out.resolve() in (Path.cwd().resolve(), Path.home().resolve(), Path("/").resolve()):
            raise InputError(f"--out {out} is the current, home or root folder; expected a folder of its own")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise InputError(f"--out {out} holds files that p2p did not write; expected a new or empty folder, or "
                             "one written by p2p (which is replaced whole)")
    _check_writable(out.parent if not out.exists() else out, out)
    return out


def check_output_file(path: str | Path, owned: Callable[[Path], bool] | None = None, what: str = "--out") -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder, a link, a path under a file, no
    permission, or an existing file this tool did not write (`owned(path)` says whether it did; without it, any
    existing file is refused)."""
    path = Path(path).expanduser()
    if path.is_symlink():
        raise InputError(f"{what} {path} is a link; expected a plain file name (links are not followed)")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; expected a file name")
    if path.exists() and not (owned is not None and owned(path)):
        raise InputError(f"{what} {path} already exists and was not written by p2p; expected a new file name, or a "
                         "file p2p wrote (which is replaced)")
    _check_writable(path.parent, path)
    return path


def png_owned(path: Path) -> bool:
    """Whether a PNG file was written by this tool (its "Software" text)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == SOFTWARE
    except Exception:
        return False


def png_info():
    """PNG text chunks marking a picture as this tool's (see `png_owned`)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", SOFTWARE)
    return info


@contextmanager
def staged_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object to write `path`'s content into. It is a new file created exclusively beside path; when the
    block ends without error it is renamed over path (a link at path is replaced, not followed), otherwise removed.
    Check path first with `check_output_file`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".part", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        publish(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged(out: str | Path, owned: bool = False) -> Iterator[Path]:
    """Yield a scratch folder beside out; on success it becomes out (an earlier p2p folder there is replaced whole),
    on failure or interruption nothing is left behind. owned: the caller owns out (the package's model folder): no
    marker, no check for foreign files."""
    out = Path(out) if owned else check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        if not owned:
            (tmp / MARKER).write_text("written by prompt2prompt; the next run with this --out replaces this folder\n")
        publish(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            out.replace(old / "previous")
        tmp.replace(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

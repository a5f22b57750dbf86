"""Extract a tar archive so that nothing lands outside the destination folder, or nothing at all.

Every member is checked before anything is written: no absolute name, no `..` component,
no symbolic or hard link whose target resolves outside the destination, no device file or
FIFO, and no path that passes through a symbolic link of the archive itself (a chain such as
`a -> .` then `b -> a/../..` looks inside when read as text but leads out once `a` exists;
so does a file written through a link). One bad member refuses the whole archive with a
one-line error naming it. Where the standard library has extraction filters (Python 3.12,
and 3.11.4 / 3.10.12 backports) the `data` filter applies as well; the explicit checks are
what older Pythons rely on.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path, PurePosixPath

from .errors import UserError


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def _via_link(parts, links: frozenset[str]) -> str | None:
    """The first symbolic link of the archive that the relative path `parts` passes through."""
    walked: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if walked:
                walked.pop()
            continue
        walked.append(part)
        if "/".join(walked) in links:
            return "/".join(walked)
    return None


def member_problem(member: tarfile.TarInfo, root: Path, links: frozenset[str] = frozenset()) -> str | None:
    """Why `member` may not be extracted into `root` (resolved), or None when it may; `links`
    are the names of the archive's symbolic links (as `PurePosixPath` writes them)."""
    name = PurePosixPath(member.name)
    if member.name.startswith(("/", "\\")) or name.is_absolute() or os.path.isabs(member.name):
        return "has an absolute path"
    if ".." in name.parts:
        return "has a '..' component"
    target = root / name
    if not _inside(root, target):
        return "lands outside the folder"
    through = _via_link(name.parts[:-1] if member.issym() else name.parts, links)
    if through:
        return f"is written through the symbolic link {through!r}"
    if member.issym() or member.islnk():
        link_path = (name.parent.parts if member.issym() else ()) + PurePosixPath(member.linkname).parts
        through = _via_link(link_path, links)
        if through:
            return f"is a link to {member.linkname!r}, through the symbolic link {through!r}"
    if member.issym():
        link = PurePosixPath(member.linkname)
        if link.is_absolute() or not _inside(root, target.parent / link):
            return f"is a symbolic link to {member.linkname!r}, outside the folder"
    elif member.islnk():
        if PurePosixPath(member.linkname).is_absolute() or not _inside(root, root / member.linkname):
            return f"is a hard link to {member.linkname!r}, outside the folder"
    elif member.ischr() or member.isblk() or member.isfifo():
        return "is a device file or FIFO"
    elif not (member.isfile() or member.isdir()):
        return "is neither a file, a folder nor a link"
    return None


def extract_tar(archive: str | os.PathLike, destination: str | os.PathLike, where: str) -> None:
    """Extract `archive` into `destination` after checking every member; `where` names the
    config field or file the archive came from, for the error message."""
    root = Path(destination).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            links = frozenset(str(PurePosixPath(m.name)) for m in members if m.issym())
            for member in members:
                problem = member_problem(member, root, links)
                if problem:
                    raise UserError(f"{where}: {archive}: member {member.name!r} {problem}; "
                                    "nothing was extracted")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, members=members, filter="data")
            else:  # every member is checked above
                tar.extractall(root, members=members)
    except UserError:
        raise
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"{where}: {archive}: cannot extract: {err}") from None

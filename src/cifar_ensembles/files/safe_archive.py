"""Extract a tar archive so that nothing lands outside the destination folder, or nothing at all.

Every member is checked before anything is written: no absolute name, no `..` component,
no symbolic or hard link whose target resolves outside the destination, no device file or
FIFO, and no path that passes through a symbolic link of the archive itself (a chain such as
`a -> .` then `b -> a/../..` looks inside when read as text but leads out once `a` exists;
so does a file written through a link). One bad member refuses the whole archive with a
one-line error naming it. Where the standard library has extraction filters (Python 3.12,
and 3.11.4 / 3.10.12 backports) the `data` filter applies as well; the explicit checks are
what older Pythons rely on.

Nor does anything larger than the dataset can be land or stay in memory (`limits`): members
are listed one header at a time, and each member's declared size, the running total and the
number of members are checked as its header is read, before its data is decompressed, let
alone written. tarfile writes exactly the declared size of a member (sparse ones are
refused), so the declared sizes bound what is written. Extended headers (pax, GNU long
names), which tarfile reads into memory, may hold 1 MiB at most.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from ..errors import UserError
from .limits import Limits

EXTENDED_HEADER = 1 << 20  # a pax header or GNU long name, read into memory by tarfile


class TooLarge(Exception):
    """A member beyond its bound, seen in its header (the message says which and how)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """A header as tarfile reads it, refused before tarfile reads an extended header over
    EXTENDED_HEADER bytes into memory, or a sparse map (unbounded) at all."""

    def _proc_member(self, tarfile_):
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                    tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
        if self.type in extended and self.size > EXTENDED_HEADER:
            raise TooLarge(f"an extended header (pax or long name) declares {self.size:,} bytes, "
                           f"more than the {EXTENDED_HEADER:,} it can hold")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise TooLarge(f"member {self.name!r} is a sparse file")
        return super()._proc_member(tarfile_)

    def _proc_gnusparse_10(self, next_, pax_headers, tarfile_):
        raise TooLarge(f"member {next_.name!r} is a sparse file")


def open_tar(archive: str | os.PathLike) -> tarfile.TarFile:
    """`archive` opened for reading (any compression), its headers read by `_BoundedTarInfo`."""
    return tarfile.open(archive, "r:*", tarinfo=_BoundedTarInfo)


def bounded_members(tar: tarfile.TarFile, limits: Limits) -> Iterator[tarfile.TarInfo]:
    """The members of `tar`, one header at a time, each checked against `limits` before the
    next is read (and so before its data is decompressed): its declared size (a hard link
    counts as a copy of its target, which tarfile writes where linking fails), the running
    total and the number of members. Raises TooLarge, naming the member and both sizes."""
    sizes: dict[str, int] = {}
    total = count = 0
    while (member := tar.next()) is not None:
        count += 1
        if count > limits.count:
            raise TooLarge(f"member {member.name!r} is member {count:,}, more than the {limits.count:,} "
                           "an archive of the dataset may hold")
        size = member.size if member.isfile() else sizes.get(member.linkname, 0) if member.islnk() else 0
        bound = limits.of(member.linkname if member.islnk() else member.name)  # a link: its target's
        if size > bound:
            raise TooLarge(f"member {member.name!r} declares {size:,} bytes, more than the {bound:,} "
                           "it can hold")
        total += size
        if total > limits.total:
            raise TooLarge(f"member {member.name!r} ({size:,} bytes) brings the extracted size to "
                           f"{total:,} bytes, more than the {limits.total:,} the dataset can hold")
        sizes[member.name] = size
        yield member


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


def extract_tar(archive: str | os.PathLike, destination: str | os.PathLike, where: str,
                limits: Limits) -> None:
    """Extract `archive` into `destination` after checking every member, its size against
    `limits` included; `where` names the config field or file the archive came from, for the
    error message. Nothing is extracted unless every member passes (the caller removes
    `destination` when this raises: the download stage extracts into a staging folder)."""
    root = Path(destination).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        with open_tar(archive) as tar:
            members = list(bounded_members(tar, limits))
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
    except TooLarge as err:
        raise UserError(f"{where}: {archive}: {err}; nothing was extracted") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"{where}: {archive}: cannot extract: {err}") from None

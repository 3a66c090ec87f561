"""Read an OCI layer tarball (plain or compressed) in one streaming pass into an image tree.

Whiteouts (`.wh.*`, `.wh..wh..opq`) stay the ordinary empty files they are in the layer.
Later members replace earlier ones at the same path, as extraction would.
"""

from __future__ import annotations

import base64
import lzma
import os
import stat
import tarfile
import urllib.parse
import zlib

from nydus_actors.rafs.builder.chunker import BlobWriter, OnBytes
from nydus_actors.rafs.builder.errors import BuildError
from nydus_actors.rafs.builder.progress import Progress
from nydus_actors.rafs.builder.tree import Node, new_dir

_TYPE_MODE = {
    tarfile.REGTYPE: stat.S_IFREG,
    tarfile.AREGTYPE: stat.S_IFREG,
    tarfile.CONTTYPE: stat.S_IFREG,
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}
# tarfile decodes pax values as UTF-8 with this handler, so binary values survive a round trip.
_ERRORS = "surrogateescape"


class _BadTar(Exception):
    pass


def _encode(text: str) -> bytes:
    return text.encode("utf-8", _ERRORS)


def _components(name: str) -> list[bytes]:
    parts = [p for p in _encode(name).split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise _BadTar(f"member {name!r} climbs out of the layer")
    return parts


def parse_pax_time(text: str) -> tuple[int, int]:
    """Seconds and nanoseconds of a pax time like `1700000000.5` (fraction right-padded to 9 digits)."""
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("+-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise _BadTar(f"bad pax time {text!r}")
    total_ns = int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
    return divmod(-total_ns if negative else total_ns, 1_000_000_000)


def _xattrs(pax: dict[str, str]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :])
            out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
    for key, value in pax.items():
        # SCHILY is what Docker, containerd and Go's archive/tar write; it wins over libarchive's copy.
        if key.startswith("SCHILY.xattr."):
            out[_encode(key[len("SCHILY.xattr.") :])] = _encode(value)
    return out


def _metadata(member: tarfile.TarInfo, mode_type: int) -> Node:
    if "mtime" in member.pax_headers:
        sec, nsec = parse_pax_time(member.pax_headers["mtime"])
    else:
        sec, nsec = int(member.mtime), 0
    node = Node(
        mode=mode_type | (member.mode & 0o7777),
        uid=member.uid,
        gid=member.gid,
        mtime=sec,
        mtime_nsec=nsec,
        xattrs=_xattrs(member.pax_headers),
    )
    if mode_type == stat.S_IFDIR:
        node.children = {}
    elif mode_type == stat.S_IFLNK:
        node.target = _encode(member.linkname)
    elif mode_type in (stat.S_IFCHR, stat.S_IFBLK):
        node.rdev = os.makedev(member.devmajor, member.devminor)
    return node


class _LayerTree:
    """The tree being built, with lookup by path for parents and hard links."""

    def __init__(self) -> None:
        self.root = new_dir()

    def parent_of(self, parts: list[bytes]) -> Node:
        node = self.root
        for part in parts[:-1]:
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                # Layers usually list parents first; make the missing ones like `mkdir -p` would.
                child = node.children[part] = new_dir()
            elif not child.is_dir:
                raise _BadTar(f"{b'/'.join(parts).decode(errors='replace')}: parent is not a directory")
            node = child
        return node

    def lookup(self, parts: list[bytes]) -> Node | None:
        node = self.root
        for part in parts:
            if node.children is None or part not in node.children:
                return None
            node = node.children[part]
        return node

    def place(self, parts: list[bytes], node: Node) -> None:
        if not parts:
            if not node.is_dir:
                raise _BadTar("the layer root is not a directory")
            self._merge_dir(self.root, node)
            return
        parent = self.parent_of(parts)
        assert parent.children is not None
        old = parent.children.get(parts[-1])
        if old is not None and old.is_dir and node.is_dir:
            self._merge_dir(old, node)
        else:
            parent.children[parts[-1]] = node

    @staticmethod
    def _merge_dir(old: Node, new: Node) -> None:
        """A directory listed again (or after its children) keeps its entries, takes new metadata."""
        old.mode, old.uid, old.gid = new.mode, new.uid, new.gid
        old.mtime, old.mtime_nsec, old.xattrs = new.mtime, new.mtime_nsec, new.xattrs


def _member(
    tree: _LayerTree, tf: tarfile.TarFile, member: tarfile.TarInfo, blobs: BlobWriter, on_bytes: OnBytes
) -> bool:
    """Add one member; return True when it was a regular file."""
    parts = _components(member.name)
    if member.type == tarfile.LNKTYPE:
        target = tree.lookup(_components(member.linkname))
        if target is None or target.is_dir:
            raise _BadTar(f"hard link {member.name!r} to missing or directory {member.linkname!r}")
        if not parts:
            raise _BadTar("the layer root is a hard link")
        parent = tree.parent_of(parts)
        assert parent.children is not None
        parent.children[parts[-1]] = target
        return False
    mode_type = _TYPE_MODE.get(member.type)
    if mode_type is None:
        if member.issparse():
            mode_type = stat.S_IFREG
        else:
            raise _BadTar(f"member {member.name!r} has unsupported type {member.type!r}")
    node = _metadata(member, mode_type)
    if mode_type == stat.S_IFREG:
        reader = tf.extractfile(member)
        assert reader is not None
        node.size, node.chunks = blobs.add_file(reader, on_bytes)
        if node.size != member.size:
            raise _BadTar(f"member {member.name!r} is truncated")
    tree.place(parts, node)
    return mode_type == stat.S_IFREG


def load_tar(path: str, blobs: BlobWriter, progress: Progress | None = None) -> Node:
    """Build the tree of the layer tarball `path` (.tar, .tar.gz, ...), chunking file data into `blobs`."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed in the finally below, after tarfile is done with it
    except OSError as ex:
        raise BuildError(f"{path}: {ex.strerror}") from None
    tree = _LayerTree()
    try:
        total = os.fstat(raw.fileno()).st_size
        if progress is not None:
            progress.start(total)

        def on_bytes(n: int) -> None:
            if progress is not None:
                progress.update(raw.tell(), nbytes=n)

        with tarfile.open(fileobj=raw, mode="r|*", encoding="utf-8", errors=_ERRORS) as tf:
            for member in tf:
                if _member(tree, tf, member, blobs, on_bytes) and progress is not None:
                    progress.update(raw.tell(), files=1)
    except _BadTar as ex:
        raise BuildError(f"{path}: bad tar archive: {ex}") from None
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, UnicodeError, ValueError) as ex:
        raise BuildError(f"{path}: bad tar archive: {ex or type(ex).__name__}") from None
    except OSError as ex:
        raise BuildError(f"{path}: {ex.strerror or ex}") from None
    finally:
        raw.close()
    return tree.root

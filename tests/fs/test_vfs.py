"""The pseudo-root VFS: node-id derivation, attach/detach, shadowing, remapping."""

from __future__ import annotations

import errno
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nydus_actors.exceptions import AlreadyExists, NotFound, OtherError
from nydus_actors.fs import vfs as vfs_module
from nydus_actors.fs.base import MAX_DIR_OFFSET, StatFs
from nydus_actors.fs.vfs import PSEUDO_SLOT, ROOT_ID, Invalidation, Vfs, split_mountpoint
from tests.fs.memfs import MemoryFs

SLOT1 = 1 << 56


def names(vfs: Vfs, node: int, start: int = 0) -> list[bytes]:
    return [entry.name for entry in vfs.readdir(node, start)]


def test_empty_root_is_a_pseudo_directory() -> None:
    vfs = Vfs()

    root = vfs.getattr(ROOT_ID)

    assert root.ino == ROOT_ID
    assert stat.S_ISDIR(root.mode)
    assert names(vfs, ROOT_ID) == [b".", b".."]
    assert vfs.statfs() == StatFs()
    with pytest.raises(OSError) as info:
        vfs.lookup(ROOT_ID, b"missing")
    assert info.value.errno == errno.ENOENT


def test_root_filesystem_shows_its_own_inode_numbers() -> None:
    fs = MemoryFs(root_ino=1234, files={b"a": (5000, b"aaa"), b"b": (7, b"")})
    vfs = Vfs()

    assert vfs.attach("/", fs) == 0

    assert vfs.getattr(ROOT_ID).ino == ROOT_ID
    assert vfs.lookup(ROOT_ID, b"a").ino == 5000
    assert vfs.lookup(ROOT_ID, b"b").ino == 7
    assert vfs.read(5000, 1, 10) == b"aa"
    assert vfs.statfs() == StatFs(blocks=10, files=2)
    assert fs.lookups[5000] == 1


def test_sub_filesystem_node_ids_carry_the_slot() -> None:
    fs = MemoryFs(root_ino=1, files={b"f": (42, b"data")})
    vfs = Vfs()

    slot = vfs.attach("/img", fs)

    assert slot == 1
    root = vfs.lookup(ROOT_ID, b"img")
    assert root.ino == SLOT1 | 1
    assert fs.lookups[1] == 1  # the mount root counts a lookup like any entry
    assert vfs.lookup(root.ino, b"f").ino == SLOT1 | 42
    assert vfs.read(SLOT1 | 42, 0, 100) == b"data"
    assert vfs.lookup(root.ino, b"..").ino == ROOT_ID
    assert vfs.slots() == {"/img": 1}


def test_node_ids_are_the_same_in_every_vfs() -> None:
    def build() -> list[int]:
        vfs = Vfs()
        vfs.attach("/a/b/c", MemoryFs(files={b"x": (9, b"")}))
        vfs.attach("/a/d", MemoryFs())
        a = vfs.lookup(ROOT_ID, b"a").ino
        b = vfs.lookup(a, b"b").ino
        c = vfs.lookup(b, b"c").ino
        return [a, b, c, vfs.lookup(c, b"x").ino, vfs.lookup(a, b"d").ino]

    first, second = build(), build()

    assert first == second
    a, b, _, x, d = first
    assert a >> 56 == PSEUDO_SLOT
    assert b >> 56 == PSEUDO_SLOT
    assert x == SLOT1 | 9
    assert d == (2 << 56) | 1


def test_nested_attach_creates_and_detach_removes_pseudo_directories() -> None:
    vfs = Vfs()
    fs_c = MemoryFs()
    vfs.attach("/a/b/c", fs_c)
    vfs.attach("/a/other", MemoryFs())
    a = vfs.lookup(ROOT_ID, b"a").ino
    b = vfs.lookup(a, b"b").ino

    assert names(vfs, ROOT_ID) == [b".", b"..", b"a"]
    assert sorted(names(vfs, a)) == [b".", b"..", b"b", b"other"]
    assert vfs.getattr(a).nlink == 4

    invalidations = vfs.detach("/a/b/c")

    # /a/b became empty and went away; /a still holds /a/other.
    assert invalidations == (Invalidation(a, b"b"),)
    assert fs_c.closed
    assert sorted(names(vfs, a)) == [b".", b"..", b"other"]
    with pytest.raises(OSError) as info:
        vfs.getattr(b)
    assert info.value.errno == errno.ENOENT

    assert vfs.detach("/a/other") == (Invalidation(ROOT_ID, b"a"),)
    assert names(vfs, ROOT_ID) == [b".", b".."]


def test_pseudo_children_shadow_root_filesystem_entries() -> None:
    root_fs = MemoryFs(root_ino=2, files={b"a": (10, b"host"), b"z": (11, b"")})
    sub_fs = MemoryFs(files={b"inner": (3, b"")})
    vfs = Vfs()
    vfs.attach("/", root_fs)
    vfs.attach("/a", sub_fs)

    assert vfs.lookup(ROOT_ID, b"a").ino == SLOT1 | 1
    listing = list(vfs.readdir(ROOT_ID, 0))
    assert [entry.name for entry in listing] == [b".", b"..", b"z", b"a"]
    assert [entry.attr.ino for entry in listing] == [ROOT_ID, ROOT_ID, 11, SLOT1 | 1]

    invalidations = vfs.detach("/a")

    assert invalidations == (Invalidation(ROOT_ID, b"a"),)
    assert vfs.lookup(ROOT_ID, b"a").ino == 10


def test_root_listing_offsets_are_stable() -> None:
    vfs = Vfs()
    vfs.attach("/", MemoryFs(files={b"f1": (20, b""), b"f2": (21, b"")}))
    vfs.attach("/m1", MemoryFs())
    vfs.attach("/p/m2", MemoryFs())
    full = list(vfs.readdir(ROOT_ID, 0))

    for index, entry in enumerate(full):
        rest = [later.name for later in vfs.readdir(ROOT_ID, entry.next_offset)]
        assert rest == [later.name for later in full[index + 1 :]]
    assert all(entry.next_offset > MAX_DIR_OFFSET for entry in full if entry.name in (b"m1", b"p"))

    # A new pseudo child does not move the offsets of the others.
    vfs.attach("/m0", MemoryFs())
    offsets = {entry.name: entry.next_offset for entry in vfs.readdir(ROOT_ID, 0)}
    assert all(offsets[entry.name] == entry.next_offset for entry in full)


def test_detach_root_filesystem_invalidates_names_the_kernel_got() -> None:
    fs = MemoryFs(files={b"a": (10, b""), b"b": (11, b""), b"c": (12, b"")})
    vfs = Vfs()
    vfs.attach("/", fs)
    vfs.lookup(ROOT_ID, b"b")
    list(vfs.readdir(ROOT_ID, 3))  # hands out "b" and "c"

    invalidations = vfs.detach("/")

    assert invalidations == (Invalidation(ROOT_ID, b"b"), Invalidation(ROOT_ID, b"c"))
    assert fs.closed
    assert vfs.getattr(ROOT_ID).ino == ROOT_ID
    assert names(vfs, ROOT_ID) == [b".", b".."]


@pytest.mark.parametrize("inner", [0, 1, 1 << 55, 1 << 60, 1 << 70])
def test_inode_numbers_that_do_not_fit_are_remapped(inner: int) -> None:
    fs = MemoryFs(root_ino=99, files={b"odd": (inner, b"odd data")})
    vfs = Vfs()
    vfs.attach("/", fs)

    node = vfs.lookup(ROOT_ID, b"odd").ino

    assert node != ROOT_ID
    assert 1 << 55 <= node < 1 << 56
    assert vfs.getattr(node).ino == node
    assert vfs.read(node, 0, 3) == b"odd"
    vfs.forget(node, 1)
    assert fs.forgotten[inner] == 1
    other = Vfs()
    other.attach("/", MemoryFs(root_ino=99, files={b"odd": (inner, b"")}))
    assert other.lookup(ROOT_ID, b"odd").ino == node


def test_inode_one_is_kept_in_a_sub_slot() -> None:
    vfs = Vfs()
    vfs.attach("/x", MemoryFs(root_ino=5, files={b"one": (1, b"")}))

    assert vfs.lookup(SLOT1 | 5, b"one").ino == SLOT1 | 1


def test_remapping_collisions_are_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vfs_module, "_hash56", lambda data, probe: 7 + probe)
    fs = MemoryFs(root_ino=2, files={b"x": (1 << 60, b"x"), b"y": (1 << 61, b"y")})
    vfs = Vfs()
    vfs.attach("/", fs)

    x = vfs.lookup(ROOT_ID, b"x").ino
    y = vfs.lookup(ROOT_ID, b"y").ino

    assert x != y
    assert vfs.read(x, 0, 1) == b"x"
    assert vfs.read(y, 0, 1) == b"y"


def test_unknown_nodes_give_enoent_and_are_ignored_by_forget() -> None:
    vfs = Vfs()
    vfs.attach("/a", MemoryFs())

    for node in (5, (3 << 56) | 5, (PSEUDO_SLOT << 56) | 5, SLOT1 | (1 << 55)):
        with pytest.raises(OSError) as info:
            vfs.getattr(node)
        assert info.value.errno == errno.ENOENT
        vfs.forget(node, 1)
        vfs.release(node)
        vfs.releasedir(node)


def test_pseudo_directories_reject_file_operations() -> None:
    vfs = Vfs()
    vfs.attach("/a/b", MemoryFs())
    a = vfs.lookup(ROOT_ID, b"a").ino

    for call, code in (
        (lambda: vfs.open(a, 0), errno.EISDIR),
        (lambda: vfs.read(a, 0, 1), errno.EISDIR),
        (lambda: vfs.readlink(a), errno.EINVAL),
        (lambda: vfs.getxattr(a, b"user.x"), errno.ENODATA),
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == code
    assert vfs.listxattr(a) == []
    vfs.opendir(a)
    assert vfs.lookup(a, b".").ino == a
    assert vfs.lookup(a, b"..").ino == ROOT_ID


@pytest.mark.parametrize("path", ["", "a", "/a/", "//a", "/a//b", "/a/../b", "/./a", "/a/.", "/a\0b"])
def test_bad_mountpoints_are_refused(path: str) -> None:
    vfs = Vfs()

    with pytest.raises(OtherError) as info:
        vfs.attach(path, MemoryFs())

    assert str(info.value).startswith("VFS failed to handle request, invalid mountpoint")
    with pytest.raises(OtherError):
        vfs.detach(path)
    assert split_mountpoint("/a/b") == (b"a", b"b")


def test_attach_conflicts() -> None:
    vfs = Vfs()
    vfs.attach("/", MemoryFs())
    vfs.attach("/a", MemoryFs())
    vfs.attach("/p/q", MemoryFs())

    with pytest.raises(AlreadyExists):
        vfs.attach("/", MemoryFs())
    with pytest.raises(AlreadyExists):
        vfs.attach("/a", MemoryFs())
    with pytest.raises(AlreadyExists):
        vfs.attach("/p", MemoryFs())  # a pseudo directory with a filesystem below it
    with pytest.raises(OtherError, match="inside the filesystem mounted at /a"):
        vfs.attach("/a/b", MemoryFs())
    with pytest.raises(NotFound):
        vfs.detach("/p")
    with pytest.raises(NotFound):
        vfs.detach("/nothing")
    assert vfs.slots() == {"/": 0, "/a": 1, "/p/q": 2}


def test_slots_are_chosen_lowest_first_or_as_asked() -> None:
    vfs = Vfs()
    vfs.attach("/a", MemoryFs())
    vfs.attach("/b", MemoryFs())
    vfs.detach("/a")

    assert vfs.attach("/c", MemoryFs()) == 1
    assert vfs.attach("/d", MemoryFs(), slot=200) == 200
    with pytest.raises(OtherError, match="slot 200 is not free"):
        vfs.attach("/e", MemoryFs(), slot=200)
    with pytest.raises(OtherError, match="slot 255 is not free"):
        vfs.attach("/e", MemoryFs(), slot=PSEUDO_SLOT)
    with pytest.raises(OtherError):
        vfs.attach("/", MemoryFs(), slot=3)
    assert vfs.slots() == {"/b": 2, "/c": 1, "/d": 200}


def test_all_sub_slots_can_be_used() -> None:
    vfs = Vfs()
    for index in range(254):
        vfs.attach(f"/m{index}", MemoryFs())

    with pytest.raises(OtherError, match="no free slot"):
        vfs.attach("/one-too-many", MemoryFs())


def test_readdirplus_entries_count_through_count_lookup() -> None:
    fs = MemoryFs(files={b"f": (8, b"")})
    vfs = Vfs()
    vfs.attach("/s", fs)

    entries = list(vfs.readdir(SLOT1 | 1, 0))
    assert [entry.name for entry in entries] == [b".", b"..", b"f"]
    assert entries[1].attr.ino == ROOT_ID  # ".." of a mount root is its pseudo parent
    assert fs.lookups[8] == 0

    vfs.count_lookup(entries[2].attr.ino)

    assert fs.lookups[8] == 1


def test_close_closes_every_filesystem() -> None:
    filesystems = [MemoryFs(), MemoryFs(), MemoryFs()]
    vfs = Vfs()
    for path, fs in zip(("/", "/a", "/b/c"), filesystems, strict=True):
        vfs.attach(path, fs)

    vfs.close()

    assert all(fs.closed for fs in filesystems)
    assert vfs.slots() == {}
    assert names(vfs, ROOT_ID) == [b".", b".."]


@given(inos=st.sets(st.integers(min_value=0, max_value=1 << 80), min_size=1, max_size=40))
def test_node_ids_are_unique_reversible_and_derivable(inos: set[int]) -> None:
    files = {f"f{index}".encode(): (ino, ino.to_bytes(11, "little")) for index, ino in enumerate(inos)}

    def nodes_of(slot_path: str) -> dict[bytes, int]:
        vfs = Vfs()
        vfs.attach(slot_path, MemoryFs(root_ino=(1 << 80) + 1, files=files))
        parent = ROOT_ID if slot_path == "/" else vfs.lookup(ROOT_ID, slot_path[1:].encode()).ino
        found = {name: vfs.lookup(parent, name).ino for name in files}
        for name, node in found.items():
            assert vfs.read(node, 0, 11) == files[name][1]
        return found

    for path in ("/", "/sub"):
        first = nodes_of(path)
        assert len(set(first.values())) == len(first)
        assert ROOT_ID not in first.values()
        assert first == nodes_of(path)

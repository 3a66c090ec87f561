"""`image create`: flags, one-line errors with exit code 1, the progress bar."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from nydus_actors import image_cli
from nydus_actors.rafs.builder import source as source_mod
from nydus_actors.rafs.builder.progress import Progress
from tests.rafs.builder import decode


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"payload" * 1000)
    (tmp_path / "blobs").mkdir()
    return src


def _create(tmp_path: Path, *args: str) -> int:
    return image_cli.main(
        ["create", "--bootstrap", str(tmp_path / "boot"), "--blob-dir", str(tmp_path / "blobs"), *args]
    )


def test_create_prints_the_blob_id_and_writes_json(tree, tmp_path, capsys):
    out_json = tmp_path / "out.json"
    rc = _create(
        tmp_path,
        "--chunk-size",
        "0x1000",
        "--compressor",
        "lz4_block",
        "--digester",
        "sha256",
        "-J",
        str(out_json),
        str(tree),
    )
    assert rc == 0
    stdout, stderr = capsys.readouterr()
    blob_id = stdout.strip()
    assert stderr == ""
    assert (tmp_path / "blobs" / blob_id).is_file()
    summary = json.loads(out_json.read_text())
    assert summary["blobs"] == [blob_id] and summary["bootstrap"] == str(tmp_path / "boot")
    image = decode(tmp_path / "boot", tmp_path / "blobs" / blob_id)
    assert image.ext["chunk_size"] == 0x1000
    assert (image.blob["compression_algo"], image.blob["digest_algo"]) == (1, 1)
    assert image.tree.entries[b"/d/f"]["size"] == 7000


def _one_error_line(capsys) -> str:
    stdout, stderr = capsys.readouterr()
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("size", ["0x1800", "0x800", "0x2000000", "0", "-4096", "lots", "1000000"])
def test_bad_chunk_size(tree, tmp_path, capsys, size):
    assert _create(tmp_path, "--chunk-size", size, str(tree)) == 1
    assert "chunk size" in _one_error_line(capsys)


@pytest.mark.parametrize("size", ["0x1000", "4096", "0x1000000", "16777216"])
def test_chunk_size_bounds_accepted(tree, tmp_path, size):
    assert _create(tmp_path, "--chunk-size", size, str(tree)) == 0


def test_missing_source(tmp_path, capsys):
    (tmp_path / "blobs").mkdir()
    assert _create(tmp_path, str(tmp_path / "nope")) == 1
    line = _one_error_line(capsys)
    assert "nope" in line and "No such file" in line


def test_not_a_tar(tmp_path, capsys):
    (tmp_path / "blobs").mkdir()
    (tmp_path / "x.tar.gz").write_bytes(b"\x1f\x8b garbage")
    assert _create(tmp_path, str(tmp_path / "x.tar.gz")) == 1
    assert "bad tar archive" in _one_error_line(capsys)
    assert list((tmp_path / "blobs").iterdir()) == []


def test_unreadable_file(tree, tmp_path, capsys, monkeypatch):
    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    # Root reads any mode-000 file, so the refusal is simulated at the open() the walker uses.
    monkeypatch.setattr(source_mod, "open", denied, raising=False)
    assert _create(tmp_path, str(tree)) == 1
    line = _one_error_line(capsys)
    assert line.endswith("/d/f: Permission denied")
    assert not (tmp_path / "boot").exists()


def test_missing_blob_dir_and_bad_flags(tree, tmp_path, capsys):
    rc = image_cli.main(["create", "-B", str(tmp_path / "boot"), "-D", str(tmp_path / "none"), str(tree)])
    assert rc == 1
    assert "blob directory" in _one_error_line(capsys)
    assert _create(tmp_path, "--compressor", "gzip", str(tree)) == 1
    assert "compressor" in _one_error_line(capsys)
    assert _create(tmp_path, "--type", "targz-rafs", str(tree)) == 1
    assert "needs a tar archive" in _one_error_line(capsys)
    assert image_cli.main(["create", str(tree)]) == 1
    assert "--bootstrap" in _one_error_line(capsys)
    assert image_cli.main([]) == 1
    _one_error_line(capsys)
    assert image_cli.main(["create", "--help"]) == 0
    assert "--chunk-size" in capsys.readouterr().out


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_for_large_sources_on_a_terminal():
    tty = _Tty()
    bar = Progress(tty, threshold=100)
    bar.start(1000)
    bar.update(500, files=1, nbytes=500)
    bar.close()
    assert "100.0%" in tty.getvalue() and "1 files" in tty.getvalue() and tty.getvalue().endswith("\n")

    small = _Tty()
    bar = Progress(small, threshold=100)
    bar.start(99)
    bar.update(99, files=1, nbytes=99)
    bar.close()
    assert small.getvalue() == ""

    pipe = io.StringIO()
    bar = Progress(pipe, threshold=0)
    bar.start(10**9)
    bar.update(10, files=1, nbytes=10)
    bar.close()
    assert pipe.getvalue() == ""


def test_cli_is_silent_on_stderr_when_not_a_terminal(tree, tmp_path, capsys):
    assert _create(tmp_path, str(tree)) == 0
    assert capsys.readouterr().err == ""

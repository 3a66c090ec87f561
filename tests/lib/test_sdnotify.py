"""Tests of sd_notify with real datagram sockets standing in for systemd."""

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_actors._lib.sdnotify import notify


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def test_sends_one_datagram_to_path_socket(
    tmp_path: Path, receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))

    assert notify("READY=1\nSTATUS=serving") is True

    assert receiver.recv(4096) == b"READY=1\nSTATUS=serving"


def test_leading_at_names_an_abstract_socket(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"nydus-actors-test-{os.getpid()}-{id(receiver)}"
    receiver.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)

    assert notify("STOPPING=1") is True

    assert receiver.recv(4096) == b"STOPPING=1"


def test_unset_variable_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    assert notify("READY=1") is False


def test_send_failure_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))

    with caplog.at_level(logging.WARNING, logger="nydus_actors._lib.sdnotify"):
        assert notify("READY=1") is False

    assert "failed to notify systemd" in caplog.text


def test_unsupported_address_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")

    with caplog.at_level(logging.WARNING, logger="nydus_actors._lib.sdnotify"):
        assert notify("READY=1") is False

    assert "unsupported NOTIFY_SOCKET" in caplog.text

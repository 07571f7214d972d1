"""Shared pieces of the datagram transport tests."""

from __future__ import annotations


class Receiver:
    """A ``DatagramReceiver`` that records what a transport hands it."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.closed: list[str] = []

    def datagram_received(self, data: bytes) -> None:
        self.datagrams.append(data)

    def transport_closed(self, reason: str) -> None:
        self.closed.append(reason)

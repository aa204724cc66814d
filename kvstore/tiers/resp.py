"""RESP on the connections of a redis-py client, where redis-py's own path cost the KV tier CPU.

``send_commands`` writes a batch of commands in one ``sendmsg``, each large argument (a block's
value) sent as it is, never copied into the packed command, and reads the replies in order.
redis-py's pipeline took 0.1-0.2 ms more CPU for a 2-block store (its command stack, retry and
event machinery, one ``sendall`` a buffer; docs/benchmarks.md), and its ``hiredis`` packer
copies each value. ``MgetReader`` reads an ``MGET`` reply into one buffer, reused, and hands
over each value as soon as it is in.

Both use a connection of the client's own pool (its login, TLS, timeouts): any error but a
command's own error reply closes the connection, so the pool opens a fresh one next time.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

INLINE_BYTES = 4096  # a longer argument is its own buffer of the sendmsg, not copied
_IOV_MAX = 512

Argument = str | int | bytes | bytearray | memoryview


def pack_commands(commands: Sequence[Sequence[Argument]]) -> list[bytes | bytearray | memoryview]:
    """The RESP arrays of ``commands`` as buffers to send in order: small arguments copied into
    the buffers between the large ones, which are passed as they are."""
    buffers: list[bytes | bytearray | memoryview] = []
    head = bytearray()
    for command in commands:
        head += b"*%d\r\n" % len(command)
        for argument in command:
            data: bytes | bytearray | memoryview
            if isinstance(argument, str):
                data = argument.encode()
            elif isinstance(argument, int):
                data = b"%d" % argument
            else:
                data = argument
            size = memoryview(data).nbytes
            head += b"$%d\r\n" % size
            if size > INLINE_BYTES:
                buffers += [head, data]
                head = bytearray(b"\r\n")
            else:
                head += data
                head += b"\r\n"
    buffers.append(head)
    return buffers


def send_commands(client: Any, commands: Sequence[Sequence[Argument]]) -> list[Any] | None:
    """The replies of ``commands``, sent at once on one connection of ``client``, in order; a
    command's error reply comes back as its ``ResponseError`` (a pipeline's
    ``raise_on_error=False``). None when ``client`` is not one this can use (not a plain
    ``redis.Redis``). Raises ``redis`` ``ConnectionError``/``TimeoutError`` when the connection
    fails (the connection is closed then)."""
    with _pooled_socket(client) as pooled:
        if pooled is None:
            return None
        connection, sock = pooled
        try:
            _send_all(sock, pack_commands(commands))
        except TimeoutError:
            raise RedisTimeoutError("Timeout writing to Redis") from None
        except OSError as exc:
            raise RedisConnectionError(f"Error writing to Redis: {exc}") from None
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except ResponseError as exc:  # the command's own error: the connection is fine
                replies.append(exc)
        return replies


@contextmanager
def _pooled_socket(client: Any) -> Iterator[tuple[Any, Any] | None]:
    """A connection of ``client``'s pool and its socket while the block runs, then back to the
    pool; None when ``client`` is not a plain ``redis.Redis`` or the connection has no socket.
    An exception closes the connection first: the pool opens a fresh one next time."""
    if type(client) is not redis.Redis:
        yield None
        return
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        sock = getattr(connection, "_sock", None)
        yield None if sock is None else (connection, sock)
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def _send_all(sock: socket.socket, buffers: list[bytes | bytearray | memoryview]) -> None:
    """``buffers`` in one ``sendmsg`` where the socket takes it (TLS sockets have none)."""
    views = [view for view in (memoryview(buffer).cast("B") for buffer in buffers) if view.nbytes]
    if isinstance(sock, ssl.SSLSocket):
        for view in views:
            sock.sendall(view)
        return
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while sent:
            if sent >= views[0].nbytes:
                sent -= views.pop(0).nbytes
            else:
                views[0], sent = views[0][sent:], 0


class MgetReader:
    """Sends ``MGET`` on a connection of a redis-py client and reads the reply (RESP2 or RESP3)
    off its socket into one buffer, reused: the values come back as views of it (None for a
    missing key). Any error, or a reply that is not the array asked for, closes the connection
    (the pool opens a fresh one) and raises. A buffer grown past ``RETAINED_BYTES`` is not kept."""

    RETAINED_BYTES = 64 << 20

    def __init__(self) -> None:
        self._buffer = bytearray(1 << 20)

    def reserve(self, num_bytes: int) -> None:
        """A buffer of ``num_bytes`` now (up to ``RETAINED_BYTES``), its pages written once, so
        that replies that fit are read with no allocation or page fault."""
        size = min(int(num_bytes), self.RETAINED_BYTES)
        if size > len(self._buffer):
            self._buffer = bytearray(size)  # zero-filled: every page is touched here

    @staticmethod
    def usable(client: Any) -> bool:
        """Whether this reader can read for ``client`` (a plain ``redis.Redis``)."""
        return type(client) is redis.Redis

    def each(self, client: Any, keys: Sequence[str]) -> Generator[memoryview | None, None, None]:
        """The values of ``keys`` in order, each as soon as its bytes are in, so that the caller
        works on one while the server still sends the next (a restore decrypts and copies a
        block meanwhile). Views of the buffer, valid until the next call. ``client`` must be
        ``usable``. An error, or a caller that stops before the end (the rest of the reply
        unread), closes the connection."""
        with _pooled_socket(client) as pooled:
            if pooled is None:  # not usable, or a pooled connection without a socket
                raise RedisConnectionError("no socket to read an MGET reply from")
            connection, sock = pooled
            connection.send_command("MGET", *keys)
            for span in self._spans(sock, len(keys)):
                yield None if span is None else memoryview(self._buffer)[span[0] : span[0] + span[1]]
        if len(self._buffer) > self.RETAINED_BYTES:
            self._buffer = bytearray(1 << 20)  # the views keep the large one alive meanwhile

    def _spans(self, sock: Any, count: int) -> Iterator[tuple[int, int] | None]:
        """(offset, length) in the buffer of each value of an ``MGET`` reply of ``count``, each
        as soon as it is received; then the reply is checked to end there."""
        self._filled = 0
        self._pos = 0
        header = self._line(sock)
        if header[:1] in (b"-", b"!"):
            raise ResponseError(header[1:].decode(errors="replace"))
        if header != b"*%d" % count:
            raise ValueError(f"an MGET of {count} keys answered {header[:32]!r}")
        sized = False
        for index in range(count):
            line = self._line(sock)
            if line in (b"$-1", b"_"):
                yield None
                continue
            if line[:1] != b"$":
                raise ValueError(f"an MGET value is not a bulk string: {line[:32]!r}")
            length = int(line[1:])
            if not sized:  # a run's blocks have one size: room for all of them, grown once
                self._grow(self._pos + (count - index) * (length + len(line) + 4))
                sized = True
            self._fill(sock, self._pos + length + 2)
            if self._buffer[self._pos + length : self._pos + length + 2] != b"\r\n":
                raise ValueError("an MGET value does not end where its length says")
            start = self._pos
            self._pos += length + 2
            yield start, length
        if self._filled != self._pos:
            raise ValueError("an MGET reply is followed by unexpected bytes")

    def _line(self, sock: Any) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n", self._pos, self._filled)
            if end >= 0:
                line = bytes(self._buffer[self._pos : end])
                self._pos = end + 2
                return line
            self._fill(sock, self._filled + 1)

    def _grow(self, size: int) -> None:
        """A buffer of at least ``size`` bytes holding what was received (a new one: views of
        the old one may still be read)."""
        if size > len(self._buffer):
            grown = bytearray(size)
            grown[: self._filled] = self._buffer[: self._filled]
            self._buffer = grown

    def _fill(self, sock: Any, size: int) -> None:
        """Receive until the buffer holds ``size`` bytes (growing it when it is smaller)."""
        if size > len(self._buffer):
            self._grow(max(size, 2 * len(self._buffer)))
        view = memoryview(self._buffer)
        try:
            while self._filled < size:
                received = sock.recv_into(view[self._filled :])
                if received == 0:
                    raise ConnectionError("Redis closed the connection during an MGET reply")
                self._filled += received
        finally:
            view.release()

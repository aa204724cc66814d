"""StoreProcess: the write-behind stores in a child process, off the engine process's GIL.

``WriteBehind``'s contract (``StoreQueue``), with the writing (encoding, sealing, the file
writes, the Redis pipeline) done by a child process at low CPU priority instead of a thread of
the engine process, where its Python time held the GIL that the scheduler and the forward's
glue wait for:

    engine process                                       store process (os.nice 10, spare cores)
      step: submit ─► bounded queue ─► sender thread ──socket──► encode, seal, write (TierManager
                       (max_pending_bytes;   pickles the batch,    built from the same config)
                        a batch that does    arrays out of band:      │
                        not fit is dropped,  one sendmsg, no copy     │
                        counted)                                      │
      TierManager.record ◄─ reader thread ◄──── per batch: done, its tier events, occupancy

The step only queues (no pickling, no I/O); the parent's two threads spend their time in
``sendmsg``/``recv``, outside the GIL. A batch's bytes count against ``max_pending_bytes`` from
``submit`` until the child reports it written. The child builds its own tiers from the
connector's config (``tiers.build.build_manager``), sent over the socket, never in argv or the
environment; it reads the Redis password from the config's file itself, and the sealing keys
from the keyring as the thread did.

The child dies with the engine: it exits when its socket reaches end of file (the parent
closed it, or died), or within ``PARENT_CHECK_S`` of finding itself orphaned (a process the
parent forked may still hold the socket). Not ``PR_SET_PDEATHSIG``: it fires when the thread
that started the child ends, not the process. If the child dies first, the parent logs it
once, counts the batches it had sent and not seen written as dropped, and starts a new child
for the next batch, at most one start per ``restart_after_s``. ``subprocess`` rather than
``multiprocessing``: vLLM's engine core process may be daemonic, and multiprocessing refuses
children of daemonic processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.cpu_placement import move_this_thread
from kvstore.manager import TierManager
from kvstore.tier import Tier, TierEvent, TierEventKind, TierUsage
from kvstore.write_behind import StoreBatch, StoreQueue, write_batch

logger = logging.getLogger("vllm.zumik.kvstore")

NICENESS = 10  # added to the engine's: the store process yields the cores to the serving path
RESTART_AFTER_S = 5.0
_FIXED = struct.Struct("!QI")  # pickle bytes, out-of-band buffers
_IOV_MAX = 512
PARENT_CHECK_S = 1.0  # how often an idle store process checks that its parent lives


@dataclass(frozen=True)
class _Init:
    """The child's first message: what it builds its tiers from and how it runs."""

    config: dict[str, Any]
    usage_every_s: float | None
    cpus: frozenset[int] | None
    niceness: int
    parent_pid: int


@dataclass(frozen=True)
class _Report:
    """Child -> parent: ``written`` batches done since the last report (in order), the tier
    events they made, and the occupancy when measured anew (None: not measured)."""

    written: int
    events: list[TierEvent]
    usage: tuple[TierUsage, ...] | None


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    sock: socket.socket
    sent: deque[StoreBatch]  # sent, not reported written yet (the child writes in order)
    reader: threading.Thread | None = None
    gone: bool = False  # its batches are accounted for: by ``_lost`` or by ``close``


class StoreProcess(StoreQueue):
    def __init__(
        self,
        manager: TierManager,
        config: dict[str, Any],
        *,
        max_pending_bytes: int,
        usage_every_s: float | None = 5.0,
        cpus: frozenset[int] | None = None,
        niceness: int = NICENESS,
        restart_after_s: float = RESTART_AFTER_S,
    ) -> None:
        """``manager``: this process's, where the child's tier events are recorded (its
        ``take_events`` feeds the connector's stats); ``config``: the connector's, from which
        the child builds its own tiers."""
        super().__init__(manager, max_pending_bytes=max_pending_bytes, usage_every_s=usage_every_s, cpus=cpus)
        self._config = dict(config)
        self._niceness = niceness
        self._restart_after_s = restart_after_s
        self._sending: StoreBatch | None = None  # pending bytes: queued, being sent, sent until written
        self._sender: threading.Thread | None = None
        self._child: _Child | None = None
        self._children: list[_Child] = []  # every child started, for close
        self._next_start = float("-inf")

    @property
    def pid(self) -> int | None:
        """The current store process's pid (None: none running)."""
        child = self._child
        return None if child is None else child.process.pid

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every batch taken so far is written (or lost with its process, counted);
        False if ``timeout_s`` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._pending_bytes == 0, timeout=timeout_s)

    def close(self, timeout_s: float = 30.0) -> int:
        """Take no more batches; let the store process write what was taken within ``timeout_s``,
        then stop it. Returns how many blocks were not reported written (counted as dropped)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)
        left: list[StoreBatch] = []
        with self._changed:  # what is not written by now is counted here, not by the readers
            left.extend(self._queue)
            self._queue.clear()
            if self._sending is not None:
                left.append(self._sending)
                self._sending = None
            children = list(self._children)
            for child in children:
                if not child.gone:
                    child.gone = True
                    left.extend(child.sent)
                    child.sent.clear()
            self._child = None
            self._pending_bytes -= sum(batch.num_bytes for batch in left)
            self._changed.notify_all()
        for child in children:  # end of file: the child measures once more and exits
            with contextlib.suppress(OSError):
                child.sock.shutdown(socket.SHUT_WR)
        for child in children:
            try:
                child.process.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            if child.reader is not None:
                child.reader.join(max(deadline - time.monotonic(), 1.0))  # its last report
            child.sock.close()
        if self._sender is not None:
            self._sender.join(max(deadline - time.monotonic(), 1.0))
        return self._left_at_shutdown(left)

    # --- the parent's threads ---------------------------------------------------------------

    def _begin(self) -> None:
        self._sender = threading.Thread(target=self._send_loop, name="zumik-kv-sender", daemon=True)
        self._sender.start()

    def _send_loop(self) -> None:
        move_this_thread(self.cpus)
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return  # closed, nothing left to send
                child = self._child
                if child is None and time.monotonic() < self._next_start:
                    self._changed.wait(self._next_start - time.monotonic())
                    continue
                batch = self._sending = self._queue.popleft()
            if child is None:
                child = self._start_child()
            try:
                buffers: list[pickle.PickleBuffer] = []
                data = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
            except Exception:
                logger.exception("zumik kv: a store batch cannot be handed to the store process")
                data = None
            with self._changed:
                if self._sending is not batch:
                    continue  # close counted it
                self._sending = None
                handed = data is not None and child is not None and not child.gone
                if handed and child is not None:
                    child.sent.append(batch)
            if data is None:
                failure = TierEvent(
                    TierEventKind.FAILURE, Tier.ENGINE, len(batch.addresses), 0, "store raised"
                )
                self.manager.record(failure)
                self._finish([batch])
            elif not handed or child is None:
                self._finish([batch], dropped="store process gone")
            else:
                try:
                    _send_message(child.sock, data, buffers)
                except OSError:
                    self._lost(child)

    def _start_child(self) -> _Child | None:
        """A new store process, sent its configuration; None (and the next try put off) when it
        cannot start."""
        with self._changed:
            self._next_start = time.monotonic() + self._restart_after_s
        ours, theirs = socket.socketpair()
        # The child imports the same kvstore as this process, wherever vLLM found it.
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "kvstore.store_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        except OSError:
            logger.exception("zumik kv: the store process cannot start")
            ours.close()
            return None
        finally:
            theirs.close()
        init = _Init(self._config, self._usage_every_s, self.cpus, self._niceness, os.getpid())
        child = _Child(process, ours, deque())
        with contextlib.suppress(OSError):  # if it died at once, its reader counts it
            _send_message(ours, pickle.dumps(init, protocol=5), [])
        child.reader = threading.Thread(
            target=self._read_loop, args=(child,), name="zumik-kv-reader", daemon=True
        )
        child.reader.start()
        with self._changed:
            self._child = child
            self._children.append(child)
        return child

    def _read_loop(self, child: _Child) -> None:
        move_this_thread(self.cpus)
        while True:
            try:
                report = _recv_message(child.sock)
            except (OSError, EOFError, pickle.UnpicklingError):
                break
            if not isinstance(report, _Report):
                break
            for event in report.events:
                self.manager.record(event)
            if report.usage is not None:
                self._usage = report.usage
            with self._changed:
                done = [child.sent.popleft() for _ in range(min(report.written, len(child.sent)))]
            self._finish(done)
        self._lost(child)

    def _lost(self, child: _Child) -> None:
        """``child`` is gone (or going): what it was sent and did not report written is counted
        as dropped, and the next batch starts a new one (not before ``restart_after_s``)."""
        with self._changed:
            if child.gone:
                return
            child.gone = True
            lost = list(child.sent)
            child.sent.clear()
            if self._child is child:
                self._child = None
        try:
            code = child.process.wait(5.0)
        except subprocess.TimeoutExpired:
            child.process.kill()
            code = child.process.wait()
        child.sock.close()
        blocks = sum(len(batch.addresses) for batch in lost)
        logger.warning(
            "zumik kv: the store process %d exited (code %s); %d block(s) it was sent are counted "
            "as dropped, and the next store starts a new one", child.process.pid, code, blocks,
        )  # fmt: skip
        self._finish(lost, dropped="store process exited")

    def _finish(self, batches: list[StoreBatch], dropped: str | None = None) -> None:
        if not batches:
            return
        num_bytes = sum(batch.num_bytes for batch in batches)
        if dropped is not None:
            self._dropped(sum(len(batch.addresses) for batch in batches), num_bytes, dropped)
        with self._changed:
            self._pending_bytes -= num_bytes
            self._changed.notify_all()


# --- the wire: a pickle with its out-of-band buffers, length-prefixed ----------------------------


def _send_message(sock: socket.socket, data: bytes, buffers: list[pickle.PickleBuffer]) -> None:
    """``data`` (a protocol-5 pickle) and its out-of-band buffers in one ``sendmsg`` where the
    socket takes it: the arrays are not copied in this process."""
    raws = [buffer.raw() for buffer in buffers]
    head = _FIXED.pack(len(data), len(raws)) + struct.pack(f"!{len(raws)}Q", *(raw.nbytes for raw in raws))
    views = [view for view in (memoryview(head), memoryview(data), *raws) if view.nbytes]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0], sent = views[0][sent:], 0


def _recv_message(sock: socket.socket) -> Any:
    size, count = _FIXED.unpack(_recv_exact(sock, _FIXED.size))
    lengths = struct.unpack(f"!{count}Q", _recv_exact(sock, 8 * count)) if count else ()
    data = _recv_exact(sock, size)
    body = memoryview(_recv_exact(sock, sum(lengths)))
    buffers, offset = [], 0
    for length in lengths:
        buffers.append(body[offset : offset + length])
        offset += length
    return pickle.loads(data, buffers=buffers)


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        read = sock.recv_into(view[got:])
        if not read:
            raise EOFError("the other end closed")
        got += read
    return buffer


# --- the child -----------------------------------------------------------------------------------


def serve(sock: socket.socket) -> None:
    """The store process's loop: write each batch as it arrives, report it with its events,
    measure the tiers every ``usage_every_s``; return at end of file."""
    init = _recv_message(sock)
    if not isinstance(init, _Init):
        raise TypeError(f"the store process was sent {type(init).__name__} first, not its configuration")
    if os.getppid() != init.parent_pid:
        return  # the parent died before it began
    if init.niceness:
        os.nice(init.niceness)
    move_this_thread(init.cpus)
    from kvstore.tiers.build import build_manager

    manager = build_manager(init.config)
    every_s, measured_at = init.usage_every_s, float("-inf")
    while True:
        wait_s = PARENT_CHECK_S if every_s is None else max(measured_at + every_s - time.monotonic(), 0.0)
        readable, _, _ = select.select([sock], [], [], min(wait_s, PARENT_CHECK_S))
        if os.getppid() != init.parent_pid:
            return  # orphaned (its socket may live on in a process the parent forked)
        written, ended = 0, False
        if readable:
            try:
                batch = _recv_message(sock)
            except EOFError:
                ended = True
            else:
                if isinstance(batch, StoreBatch):
                    write_batch(manager, batch)
                written = 1
        usage = None
        if every_s is not None and (ended or time.monotonic() - measured_at >= every_s):
            measured_at = time.monotonic()
            try:
                usage = tuple(manager.usage())
            except Exception:  # occupancy is a metric: never worth the process
                logger.exception("zumik kv: measuring the tiers failed")
        events = manager.take_events()
        if written or events or usage is not None:
            report = pickle.dumps(_Report(written, events, usage), protocol=5)
            try:
                _send_message(sock, report, [])
            except OSError:
                return  # the parent is gone
        if ended:
            return


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s zumik kv store process %(process)d: %(message)s"
    )
    sock = socket.socket(fileno=int(argv[1]))
    try:
        serve(sock)
    except EOFError:
        return 0  # the parent went away before sending its configuration
    except Exception:
        logger.exception("zumik kv: the store process failed")
        return 1
    return 0


if __name__ == "__main__":  # the module's own classes, as the parent pickled them
    from kvstore.store_process import main as store_process_main

    sys.exit(store_process_main(sys.argv))

"""The lines of a server-sent event stream, split where the format says: CR, LF or CRLF only.

httpx's ``aiter_lines`` / ``iter_lines`` split as ``str.splitlines`` does, also on U+2028,
U+2029, U+0085 and four control characters. JSON leaves the first three raw inside strings (a
writer with ``ensure_ascii=False``, vLLM's server among them), so a chunk whose text held one
came out cut in two there, the rest of its ``data:`` line lost. ``bytes.splitlines`` splits on CR
and LF alone, and never inside a UTF-8 character.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator


async def sse_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """Each line of the stream ``chunks`` (a response's bytes), without its line ending."""
    pending = b""
    async for chunk in chunks:
        lines, pending = _split(pending + chunk)
        for line in lines:
            yield line
    if pending:
        yield _text(pending)


def sse_lines_sync(chunks: Iterable[bytes]) -> Iterator[str]:
    """``sse_lines`` for a blocking client: ``sse_lines_sync(response.iter_bytes())``."""
    pending = b""
    for chunk in chunks:
        lines, pending = _split(pending + chunk)
        yield from lines
    if pending:
        yield _text(pending)


def _split(data: bytes) -> tuple[list[str], bytes]:
    """The finished lines of ``data``, and what is left to wait for: an unfinished line, or a CR
    whose LF may come in the next chunk."""
    lines = data.splitlines(keepends=True)
    pending = b""
    if lines and (lines[-1].endswith(b"\r") or not lines[-1].endswith(b"\n")):
        pending = lines.pop()
    return [_text(line) for line in lines], pending


def _text(line: bytes) -> str:
    return line.rstrip(b"\r\n").decode("utf-8", errors="replace")

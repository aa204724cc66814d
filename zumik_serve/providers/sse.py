"""The lines of a server-sent event stream, split where the format says: CR, LF or CRLF only.

httpx's ``aiter_lines`` splits as ``str.splitlines`` does, also on U+2028, U+2029, U+0085 and
four control characters. JSON leaves the first three raw inside strings (a writer with
``ensure_ascii=False``, vLLM's server among them), so a chunk whose text held one came out cut
in two there, the rest of its ``data:`` line lost. ``bytes.splitlines`` splits on CR and LF
alone, and never inside a UTF-8 character.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator


async def sse_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """Each line of the stream ``chunks`` (a response's bytes), without its line ending."""
    pending = b""
    async for chunk in chunks:
        lines = (pending + chunk).splitlines(keepends=True)
        pending = b""
        if lines and (lines[-1].endswith(b"\r") or not lines[-1].endswith(b"\n")):
            pending = lines.pop()  # unfinished, or a CR whose LF may be in the next chunk
        for line in lines:
            yield _text(line)
    if pending:
        yield _text(pending)


def _text(line: bytes) -> str:
    return line.rstrip(b"\r\n").decode("utf-8", errors="replace")

"""The one user-facing error type: its message is one line naming the file and the problem.
The CLI prints it and exits 2; the app shows it with ``st.error``."""


# Characters that str.splitlines() breaks on, shown escaped so that a message stays one line
# even when it quotes a file or tensor name holding one (``message.translate(LINE_BREAKS)``).
LINE_BREAKS = {c: repr(chr(c))[1:-1] for c in (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}


class SubnetscopeError(Exception):
    """Bad input or an impossible request, explained in one line."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    s = " ".join(str(e).split())
    return s[:limit] + ("…" if len(s) > limit else "")


def quoted(x, limit: int = 80) -> str:
    """repr for messages: quoted, escaped (one line), shortened to ``limit`` characters."""
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 1] + "…"

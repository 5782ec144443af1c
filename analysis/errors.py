"""The one user-facing error type: its message is one line naming the file and the problem.
The CLI prints it and exits 2; the app shows it with ``st.error``."""


class SubnetscopeError(Exception):
    """Bad input or an impossible request, explained in one line."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    s = " ".join(str(e).split())
    return s[:limit] + ("…" if len(s) > limit else "")

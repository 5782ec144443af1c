"""The one user-facing error type: its message is one line naming the file and the problem.
The CLI prints it and exits 2; the app shows it with ``st.error``."""


class SubnetscopeError(Exception):
    """Bad input or an impossible request, explained in one line."""

"""The one exception type a user ever sees.

Every problem with the user's input (a file, a flag, a model package) is raised as a
:class:`DleStreamError` whose message is one line: what is wrong, where (file or flag),
and how to fix it. The CLI prints it and exits non-zero, never with a traceback.
"""


class DleStreamError(Exception):
    """A user-facing error with a one-line message naming the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

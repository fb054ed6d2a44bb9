"""The project's user-facing error: the CLI prints it as one line on stderr and exits with code 2."""

from __future__ import annotations


def one_line(err: BaseException, limit: int = 300) -> str:
    """A library's message (nibabel's, ITK's and MLflow's run over several lines, MLflow's to hundreds of characters
    of urllib3 internals) as one line of at most `limit` characters, for a one-line answer or a log line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: object, limit: int = 60) -> str:
    """`value` (taken from a file or an argument) as a repr of at most `limit` characters, for a message: a value is
    echoed, never a whole input (a 1 MB string, a nested list an alias bomb built). reprlib stops early, so the full
    repr of a huge value is never built."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Seg3dError(Exception):
    """A problem the user can fix (bad file, bad config, unknown model). The message names the case and the fix."""

    def __init__(self, message: str, case: str | None = None):
        self.case = case
        super().__init__(f"{case}: {message}" if case else message)

"""The project's user-facing error: the CLI prints it as one line on stderr and exits with code 2."""

from __future__ import annotations


class Seg3dError(Exception):
    """A problem the user can fix (bad file, bad config, unknown model). The message names the case and the fix."""

    def __init__(self, message: str, case: str | None = None):
        self.case = case
        super().__init__(f"{case}: {message}" if case else message)

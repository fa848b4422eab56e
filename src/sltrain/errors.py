"""Errors a user can cause and fix.

The CLI prints a `UserError` as one line, without a traceback, and exits non-zero.
"""


class UserError(Exception):
    """A problem with the user's input (config, file, flag); the message names it and the fix."""

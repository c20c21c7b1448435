"""One exception type for user-facing problems.

The CLI prints an AqlmkitError as a single line and exits non-zero; anything else is a bug and
keeps its traceback. So every check of user input raises this, naming the problem and the fix.
"""


class AqlmkitError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""

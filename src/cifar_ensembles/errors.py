"""One exception type for problems the user can fix (bad config, bad data, bad files).

The CLI prints such an error as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, described in one line that names the field or file."""

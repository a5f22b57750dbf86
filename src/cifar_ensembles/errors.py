"""One exception type for problems the user can fix (bad config, bad data, bad files).

The CLI prints such an error as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, described in one line that names the field or file."""


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived during training; the checkpoint is written and the job exits
    with 75 (EX_TEMPFAIL) so that a rerun resumes. Here, not in `training`, so that commands
    which never train need not import torch to recognise it."""

"""User-facing errors: one line that names the file, key or shard and what to do."""


class UserError(Exception):
    """An error caused by input the user controls; the CLI prints it as one line, no traceback."""

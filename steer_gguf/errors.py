"""The one exception type for user errors: the CLI prints it as a single line."""


class SteerError(Exception):
    """A user-facing error (bad file, bad profile, wrong model...). Its message is one line
    that names the file, field or line at fault."""

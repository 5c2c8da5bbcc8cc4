"""The one exception type for user errors: the CLI prints it as a single line."""


class SteerError(Exception):
    """A user-facing error (bad file, bad profile, wrong model...). Its message is one line
    that names the file, field or line at fault."""


def printable(text: str) -> str:
    """`text` safe to print on a terminal as one line: control characters (a newline that
    would forge a second output line, ANSI escapes) shown as escapes instead."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)

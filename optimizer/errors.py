"""The one exception type that the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when the message is empty): what a
    one-line message quotes of a library's error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

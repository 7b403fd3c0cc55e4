"""The one exception type mlpspec raises for bad input.

It subclasses ValueError so callers that already catch ValueError keep working.
Messages are one line and name the offending thing; the CLI prints them as
`error: ...` without a traceback.
"""


class MLPSpecError(ValueError):
    pass


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type's name where it has none), for the
    one-line errors that name a culprit."""
    return " ".join(str(e).split()) or type(e).__name__

"""The one exception type mlpspec raises for bad input.

It subclasses ValueError so callers that already catch ValueError keep working.
Messages are one line and name the offending thing; the CLI prints them as
`error: ...` without a traceback.
"""


class MLPSpecError(ValueError):
    pass

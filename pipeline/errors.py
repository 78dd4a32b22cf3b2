"""The one exception type a stage turns into a clear message and a non-zero exit."""


class PipelineError(Exception):
    """Bad input or environment: the message names the field or file at fault."""

"""The one exception type that stage scripts turn into a clean exit."""


class PipelineError(Exception):
    """Bad input or a failed check; the message names the file and the field."""

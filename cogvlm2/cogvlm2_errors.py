"""The exception a user of the processor can act on."""


class CogVLM2InputError(ValueError):
    """A user input (video file, prompt, history, template) that CogVLM2 cannot use.

    The message names the offending path or value and says what to do about it.
    It subclasses ValueError so callers that already catch ValueError keep working.
    """

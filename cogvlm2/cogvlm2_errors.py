"""The one error family of the plugin: every error a user caused and can fix derives from CogVLM2Error.

Entry points (run_predict.py, the server, the dataset job, the trainer) catch exactly this family and
turn it into one line (exit code 2, or an HTTP 4xx); anything else is a bug and keeps its traceback.
Each message names the offending file, key or value and says what to do. The classes also subclass
ValueError, so callers that already catch ValueError keep working.
"""

__all__ = ["CogVLM2Error", "CogVLM2InputError", "CogVLM2ConfigError", "CheckpointError", "ContextLengthError",
           "GenerationOptionError"]


class CogVLM2Error(ValueError):
    """Base of every user-caused error: bad input, config, checkpoint, option or context length."""


class CogVLM2InputError(CogVLM2Error):
    """A user input (video or image file, prompt, history, template) that CogVLM2 cannot use."""


class CogVLM2ConfigError(CogVLM2Error):
    """A config file or value that cannot describe a CogVLM2 model or run."""


class CheckpointError(CogVLM2Error):
    """A checkpoint that does not fit the model: the message names the file, the tensor and the fix."""


class ContextLengthError(CogVLM2Error):
    """The prompt plus the requested new tokens do not fit the model's context."""


class GenerationOptionError(CogVLM2Error):
    """A generation option of the wrong type or out of range (max_new_tokens, top_p, ...)."""

"""Errors a user can act on. The CLI prints their message as one sentence instead of a traceback."""


class P2PError(ValueError):
    """Base class: bad input, with a message that says what was expected and what was given."""


class PromptError(P2PError):
    """A word that is not in its prompt, prompts that cannot be aligned, an unusable prompt."""


class ModelError(P2PError):
    """A folder that is not a pipeline, a hub id that is not cached, an unsupported pipeline."""


class InputError(P2PError):
    """An image that cannot be read, a file of the wrong kind, options that contradict each other."""


class NonFiniteError(InputError):
    """A generation whose latents became NaN or infinite: a setting overflowed the model's numbers."""

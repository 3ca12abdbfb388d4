"""User-facing errors: caught by the entry points and printed without a traceback."""


class LatentzooError(Exception):
    """A mistake in the user's input (config, paths, checkpoint); exits with status 2."""


class CheckpointError(LatentzooError):
    """A checkpoint is missing, unreadable, or does not match the requested model."""


class NonFiniteLossError(LatentzooError):
    """Training produced a NaN/inf loss; the message names the last finite checkpoint."""


class MissingCapabilityError(LatentzooError):
    """A metric needs a model capability (e.g. ``encode``) that the model lacks."""

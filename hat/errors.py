"""User-facing errors: each message says what happened, where, and what to change."""


class HatError(Exception):
    """Base of every error a user can cause; the CLI prints it as one line, without a traceback."""


class ConfigError(HatError):
    """A config file, override or config value is wrong."""


class RegistryError(ConfigError):
    """A `type:` name is unknown, or its arguments do not fit the registered object."""


class CheckpointError(HatError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the model."""


class DataError(HatError):
    """A dataset root or file is missing or malformed."""


class UsageError(HatError):
    """The library is called in a way that cannot work (e.g. an optimizer built before prepare_qat)."""


class OnnxExportError(HatError):
    """A model cannot be exported to ONNX; the message says why and what to change."""

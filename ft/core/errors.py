"""Named errors for bad user input. Each message names the bad value and what is valid."""


class FtError(ValueError):
    """Base class: bad input that ft refuses with a one-line message."""


class ModelNotFoundError(FtError):
    """The model name or path cannot be loaded."""


class SiteError(FtError):
    """A site string does not parse, or names a layer/point/unit the model lacks."""


class TargetError(FtError):
    """Targets cannot be built: empty list, bad k, unknown or multi-piece target word."""


class ConfigError(FtError):
    """Some other config value is out of range."""

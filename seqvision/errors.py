"""Errors caused by what the user gave us; the CLI prints these as one line instead of a traceback."""


class UserError(Exception):
    """Base class: a problem with the user's input, with a message that says what to do."""


class InputError(UserError, ValueError):
    """An input tensor or image the model cannot take (wrong size, channels, ...)."""


class UnknownModelError(UserError, KeyError):
    """A model name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable, or made for another model."""


class DataError(UserError, ValueError):
    """A data set that is missing, empty, laid out wrongly, or holds unreadable images."""


class EngineUnavailableError(UserError, RuntimeError):
    """A BiLSTM2D engine was asked for that cannot run here (no compiler, no CUDA, no triton)."""


class ConfigError(UserError, ValueError):
    """A training recipe, setting or command-line override that cannot be used."""


class DivergedError(UserError, FloatingPointError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was left as it was."""


class ExportError(UserError):
    """An export whose result does not match the model, or a format that cannot be written."""


class OutputError(UserError, OSError):
    """A result that cannot be written (read-only place, full disk, a file where a folder should be)."""


class StudyError(UserError, ValueError):
    """Study settings that cannot be used together, or an output folder that holds another study."""

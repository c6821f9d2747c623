"""Every error mtpeft raises derives from :class:`MtpeftError`; each also keeps the builtin base it always had
(``ValueError`` for bad input, ``RuntimeError`` for a failed operation), so existing ``except`` clauses still work.

This module imports nothing, so that any part of the library can use it.
"""


class MtpeftError(Exception):
    """Base of every mtpeft error: ``except mtpeft.MtpeftError`` catches all of them."""


class ConfigError(MtpeftError, ValueError):
    """A config value is invalid; the message names the field and the allowed values."""


class RunConfigError(MtpeftError, ValueError):
    """A run-config key is unknown or has a bad value; the message names the key."""


class TaskSpecError(MtpeftError, ValueError):
    """A :class:`TaskSpec` is invalid (unknown type or metric, bad template, missing label set...)."""


class DataFormatError(MtpeftError, ValueError):
    """A data file (or one of its records) is malformed; the message names the file and line."""


class TruncationError(MtpeftError, ValueError):
    """An example does not fit ``max_length`` under the chosen truncation policy."""


class AdapterLoadError(MtpeftError, ValueError):
    """A saved adapter does not fit the base model, or is not in a safe format."""


class MergeError(MtpeftError, RuntimeError):
    """The method's update cannot be folded into the base weights as asked."""


class EngineError(MtpeftError, RuntimeError):
    """An accelerate engine or engine setting mtpeft cannot train with."""


class TrainingError(MtpeftError, RuntimeError):
    """Training stopped (a non-finite loss, a failed checkpoint write); the message says where and why."""


class TrainingInterrupted(TrainingError):
    """Training stopped by Ctrl-C (SIGINT); the message says which checkpoint to resume from."""


class BenchError(MtpeftError, ValueError):
    """A bad benchmark request (unknown method, conflicting options, a changed config in a resumed folder)."""


class SuiteError(MtpeftError, ValueError):
    """An unknown suite name or a malformed custom suite; the message lists what is allowed."""


class RunFolderError(MtpeftError, FileNotFoundError):
    """A folder is not an mtpeft run folder, or lacks what was asked of it (an adapter, a checkpoint)."""


class UsageError(MtpeftError, ValueError):
    """A command-line argument asks for something that does not exist (a task the run does not have)."""


class OutputFolderError(MtpeftError, ValueError):
    """mtpeft refuses to write into a folder: not its own output, inside the source run, a file, or not writable."""


class RunLockedError(OutputFolderError):
    """Another live ``mtpeft train`` holds the run folder's lock; the message names its PID and host."""


class ResumeError(TrainingError):
    """``--resume`` with a config that changes what the saved run trained; the message names the keys."""

"""The errors caused by the input — a config, a file, a record, the data — that the entry points
report as one clear message (no traceback) and exit status 1 (``fineclip.cli.exit_on_user_error``).

Every package raises these from here, so that no module needs to import an entry point to name them.
"""

from __future__ import annotations

import contextlib


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to set."""


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names the file and the record."""


class ImageLoadError(RuntimeError):
    """An image file that cannot be decoded; the message names the file and the image id."""


class CheckpointError(RuntimeError):
    """A weights or checkpoint file that is missing, truncated or does not fit the model."""


class ProtocolError(ValueError):
    """An unknown evaluation protocol, or one used on data it is not defined for."""


class MissingImagesError(ProtocolError):
    """Benchmark images that are not on disk: evaluating without them would change the benchmark."""


class ResumeError(ValueError):
    """A checkpoint that the current config cannot continue; the message says what differs."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf and ``trainer.on_nonfinite=stop``."""


USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, AnnotationError, ImageLoadError, CheckpointError, ProtocolError, ResumeError, NonFiniteLossError,
    FileNotFoundError,
)


def user_error_in(err: BaseException | None) -> Exception | None:
    """``err`` if it is a user error, else the first user error in its chain of causes (Hydra wraps what
    a ``_target_`` raises in an ``InstantiationException``), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def user_errors_unwrapped():
    """Re-raise a user error that another exception wraps (a config's ``_target_`` refusing its
    arguments) as itself, so that callers and the entry points see its type and sentence."""
    try:
        yield
    except Exception as err:
        found = user_error_in(err)
        if found is None or found is err:
            raise
        raise found from None

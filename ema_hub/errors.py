"""Exceptions callers can catch. Each message is one line that names the problem and the fix; the CLI prints it as is.

The CLI's exit codes, stated here once (``cli`` and the commands refer to this): 0 success; 1 when any input
failed (an unreadable image, or an argument that yields no image: an error record in its place, even when no
argument yields any) or a weights, Hub or data fault stopped the run; 2 for a usage error, a request that cannot
succeed whatever the weights or data (bad options, an unknown model or tag, no input at all, an output suffix no
writer takes). Each exception's ``exit_code`` says which it is.
"""

__all__ = [
    'EmaHubError', 'UsageError', 'WeightsUnavailableError', 'UnknownModelError', 'CorruptWeightsError',
    'ShapeMismatchError', 'CheckpointKeysError', 'DataError', 'TrainingStateError', 'MissingDependencyError',
]


class EmaHubError(Exception):
    """Base class of ema-hub's errors."""
    exit_code = 1


class UsageError(EmaHubError, ValueError):
    """A request that cannot succeed as given: no input at all, an output suffix no writer takes."""
    exit_code = 2


class WeightsUnavailableError(EmaHubError, OSError):
    """Weights could not be fetched: no network, unknown repo, missing file, or offline with a cold cache."""


class UnknownModelError(UsageError):
    """An unknown variant or pretrained tag; the message lists the valid ones."""


class CorruptWeightsError(EmaHubError, ValueError):
    """A weights file is truncated, corrupted or not safetensors."""


class ShapeMismatchError(EmaHubError, ValueError):
    """A checkpoint tensor does not fit the model; the message names the first such key and both shapes."""

    def __init__(self, key: str, checkpoint_shape, model_shape, source: str = 'the checkpoint'):
        self.key, self.checkpoint_shape, self.model_shape = key, tuple(checkpoint_shape), tuple(model_shape)
        super().__init__(
            f'{source} does not fit the model: {key} has shape {self.checkpoint_shape} in the checkpoint but '
            f'{self.model_shape} in the model; pick the variant (and num_classes/in_chans) it was trained with')


class CheckpointKeysError(EmaHubError, ValueError):
    """A checkpoint's keys do not match the variant: unknown and missing keys are listed by name."""

    def __init__(self, source: str, variant: str, unknown=(), missing=()):
        self.unknown, self.missing = sorted(unknown), sorted(missing)
        parts = []
        if self.unknown:
            parts.append(f'{len(self.unknown)} unknown key(s): {_names(self.unknown)}')
        if self.missing:
            parts.append(f'{len(self.missing)} missing key(s): {_names(self.missing)}')
        super().__init__(
            f'{source} does not match {variant}: {"; ".join(parts)}; check that it is a checkpoint of {variant}')


class DataError(EmaHubError, ValueError):
    """A data folder does not have the expected layout (ImageFolder: one sub-folder of images per class), or a
    data setting is unusable; the message says what is wrong and where."""


class TrainingStateError(EmaHubError, ValueError):
    """A fine-tuning output folder's state does not fit this run: it already holds another (or a finished) run,
    or its checkpoint cannot be read or was trained on other classes."""


class MissingDependencyError(EmaHubError, ImportError):
    """An optional feature's packages are not installed; the message names the install command."""


def _names(keys, limit: int = 5) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f', ... (+{len(keys) - limit} more)' if len(keys) > limit else '')

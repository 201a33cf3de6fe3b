"""The exceptions callers catch (ema_hub/errors.py): what the CLI exits with, and one-line messages."""
import pytest

from ema_hub import errors
from ema_hub.errors import CheckpointKeysError, CorruptWeightsError, DataError, EmaHubError, ShapeMismatchError, \
    TrainingStateError, UnknownModelError, UsageError, WeightsUnavailableError


@pytest.mark.parametrize('cls, code', [
    (EmaHubError, 1), (WeightsUnavailableError, 1), (CorruptWeightsError, 1), (DataError, 1),
    (TrainingStateError, 1), (UsageError, 2), (UnknownModelError, 2),
])
def test_exit_codes(cls, code: int) -> None:
    assert cls.exit_code == code and cls('x').exit_code == code and issubclass(cls, EmaHubError)


def test_exit_codes_of_errors_with_fields() -> None:
    assert ShapeMismatchError('fc.weight', (5, 512), (7, 512)).exit_code == 1
    assert CheckpointKeysError('w.safetensors', 'resnet18_ema', unknown=['x']).exit_code == 1


def test_what_callers_can_catch_them_as() -> None:
    assert issubclass(UsageError, ValueError) and issubclass(UnknownModelError, UsageError)
    assert issubclass(WeightsUnavailableError, OSError)
    for cls in (CorruptWeightsError, ShapeMismatchError, CheckpointKeysError, DataError, TrainingStateError):
        assert issubclass(cls, ValueError)
    assert set(errors.__all__) == {name for name in dir(errors) if name.endswith('Error') and not name.startswith('_')}


def test_messages_name_the_problem_in_one_line() -> None:
    e = ShapeMismatchError('fc.weight', [5, 512], [7, 512], source='w.safetensors')
    assert (e.key, e.checkpoint_shape, e.model_shape) == ('fc.weight', (5, 512), (7, 512))
    assert str(e).startswith('w.safetensors does not fit the model: fc.weight has shape (5, 512) in the checkpoint '
                             'but (7, 512) in the model')
    keys = CheckpointKeysError('w', 'resnet18_ema', unknown=[f'k{i}' for i in range(7)], missing=['b', 'a'])
    assert keys.unknown == [f'k{i}' for i in range(7)] and keys.missing == ['a', 'b']
    assert '7 unknown key(s): k0, k1, k2, k3, k4, ... (+2 more); 2 missing key(s): a, b' in str(keys)
    assert all('\n' not in str(x) for x in (e, keys))

"""Model specs checked against the registry, where their weights live (Hub repository, file, local cache), and
the Hub's failures turned into one-line errors that say what to do."""
import contextlib
from pathlib import PurePosixPath
from typing import Iterator, List, Tuple

import timm
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError

from .errors import CorruptWeightsError, UnknownModelError, WeightsUnavailableError
from .registry import get_variant
from .specs import parse_spec

__all__ = ['pretrained_tags', 'resolve_model', 'weights_location', 'is_cached', 'hub_errors', 'WEIGHTS_FILE']

# The weights file of timm's Hub layout.
WEIGHTS_FILE = 'model.safetensors'


def pretrained_tags(variant: str) -> List[str]:
    """The pretrained tags of ``variant``, its default first: a warm tag per pretrained tag of its base."""
    return [f'warm_{tag}' for tag in get_variant(variant).base_tags]


def resolve_model(model: str) -> str:
    """Check a model spec and return it; UnknownModelError lists the valid variants or tags."""
    spec = parse_spec(model)
    if spec.is_checkpoint:
        return model
    get_variant(model)
    if spec.tag and spec.tag not in pretrained_tags(spec.name):
        raise UnknownModelError(
            f'unknown tag {spec.tag!r} for {spec.name}; valid tags: {", ".join(pretrained_tags(spec.name))}')
    return model


def weights_location(model: str) -> Tuple[str, str]:
    """(repo_id, filename) of the weights file that ``create_model(model, pretrained=True)`` downloads."""
    spec = parse_spec(resolve_model(model))
    if spec.folder is not None:
        raise UnknownModelError(f'{model} is a local folder, not a Hub checkpoint; use its path directly')
    if spec.repo_id is not None:
        return spec.repo_id, WEIGHTS_FILE
    cfg = timm.models.get_pretrained_cfg(model)
    return cfg.hf_hub_id, cfg.hf_hub_filename or WEIGHTS_FILE


def is_cached(model: str) -> bool:
    """Whether the model's weights are in the local Hugging Face cache (so HF_HUB_OFFLINE=1 can load them)."""
    repo_id, filename = weights_location(model)
    names = [filename, 'config.json'] if parse_spec(model).repo_id else [filename]
    return all(isinstance(try_to_load_from_cache(repo_id, name), str) for name in names)


@contextlib.contextmanager
def hub_errors(model: str) -> Iterator[None]:
    """Turn huggingface_hub and safetensors failures into one-line errors that say what to do."""
    where = f'the Hub at {constants.ENDPOINT}'
    try:
        yield
    except RepositoryNotFoundError:
        raise WeightsUnavailableError(
            f'{model}: repository {_repo_of(model)} not found on {where}; check the repo id, set HF_ENDPOINT to a '
            f'mirror that has it, or pass a local weights file') from None
    except RevisionNotFoundError:
        raise WeightsUnavailableError(f'{model}: revision not found on {where}; check the revision') from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise WeightsUnavailableError(
            f'{model}: weights are not in the local cache and {where} cannot be reached; connect, set HF_ENDPOINT to '
            f'a mirror, or prefetch with `ema-hub download {model}` and then use HF_HUB_OFFLINE=1, '
            f'or pass a local weights file') from None
    except EntryNotFoundError as e:
        raise WeightsUnavailableError(
            f'{model}: {_file_of(e)} is missing from its repository on {where}; check the repo holds a timm '
            f'checkpoint (config.json, model.safetensors), or pass a local weights file') from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, 'response', None), 'status_code', '?')
        raise WeightsUnavailableError(
            f'{model}: {where} answered HTTP {status}; retry later, set HF_ENDPOINT to a mirror, or pass a local '
            f'weights file') from None
    except SafetensorError as e:
        folder = parse_spec(model).folder
        fix = (f'replace {folder / "model.safetensors"} with a good copy: save it again from the run that wrote it, '
               f'or fetch it with `ema-hub download MODEL --to {folder}`' if folder is not None
               else f'download it again with `ema-hub download {model} --force`')
        raise CorruptWeightsError(f'{model}: the weights file is truncated or corrupted ({e}); {fix}') from None


def _repo_of(model: str) -> str:
    """The Hub repository a spec's weights come from."""
    spec = parse_spec(model)
    return spec.repo_id if spec.repo_id is not None else weights_location(model)[0]


def _file_of(error: Exception) -> str:
    """The file a failed Hub request asked for: the last part of the request's URL."""
    url = getattr(getattr(error, 'response', None), 'url', None)
    return PurePosixPath(str(getattr(url, 'path', ''))).name or 'a file'

"""Models and weights on the Hugging Face Hub: create, download, publish and convert, with errors callers can act on.

Model specs, everywhere (library and CLI): a variant (``resnet50_ema``, its default tag), ``variant.tag``,
``hf-hub:<repo_id>`` (a published checkpoint in timm's Hub layout) or ``local-dir:<folder>`` (the same layout
on disk). Loading is timm's own (``timm.create_model``); downloads go through huggingface_hub, so its cache,
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply.
"""
import argparse
import contextlib
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional, Tuple, Union

import safetensors.torch
import timm
import torch
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from torch import nn

from .cards import card_summary, render_card, render_grafted_card
from .errors import CorruptWeightsError, UnknownModelError, UsageError, WeightsUnavailableError
from .files import atomic_path, follow_umask
from .layers import EMA
from .models.grafted import ARCHITECTURE as GRAFTED
from .pretrained import as_variant_state, check_state_dict
from .registry import BASE_RESULTS, VARIANTS, get_variant
from .specs import HF_HUB, PathLike, parse_spec

__all__ = [
    'create_model', 'resolve_model', 'pretrained_tags', 'weights_location', 'is_cached', 'download', 'load_weights',
    'read_checkpoint', 'save_pretrained', 'publish', 'convert_checkpoint', 'class_labels', 'label_names',
    'list_variants', 'describe',
]

# Files a published checkpoint consists of (timm's Hub layout plus its card).
_CHECKPOINT_FILES = ['config.json', 'model.safetensors', 'README.md']
_WEIGHTS_FILE = 'model.safetensors'

_logger = logging.getLogger(__name__)


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
        return spec.repo_id, _WEIGHTS_FILE
    cfg = timm.models.get_pretrained_cfg(model)
    return cfg.hf_hub_id, cfg.hf_hub_filename or _WEIGHTS_FILE


def is_cached(model: str) -> bool:
    """Whether the model's weights are in the local Hugging Face cache (so HF_HUB_OFFLINE=1 can load them)."""
    repo_id, filename = weights_location(model)
    names = [filename, 'config.json'] if parse_spec(model).repo_id else [filename]
    return all(isinstance(try_to_load_from_cache(repo_id, name), str) for name in names)


@contextlib.contextmanager
def _hub_errors(model: str) -> Iterator[None]:
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


def create_model(
        model: str = 'resnet50_ema',
        *,
        pretrained: bool = True,
        weights: Optional[PathLike] = None,
        use_ema: bool = False,
        add_ema: bool = False,
        **kwargs,
) -> nn.Module:
    """``timm.create_model`` for a model spec, with pretrained weights by default and errors callers can act on.

    Args:
        model: a variant, ``variant.tag``, ``hf-hub:<repo_id>`` or ``local-dir:<folder>``; with ``add_ema``,
            any timm model (``name`` or ``name.tag``) of a family ``ema_hub.add_ema`` knows.
        pretrained: load the spec's pretrained weights.
        weights: a local weights file to load instead (EMA or base-architecture weights): safetensors, a state
            dict or a training checkpoint (``read_checkpoint``); unless num_classes is given, the model gets the
            file's classifier size.
        use_ema: take a training checkpoint's ``state_dict_ema`` (timm's averaged weights, not the EMA layer).
        add_ema: graft EMA into the timm model (``ema_hub.add_ema``, its function kept): the architecture
            ``ema_grafted``, which a saved folder names so that it loads back.
        **kwargs: timm.create_model arguments (num_classes, in_chans, features_only, ...).
    """
    if use_ema and weights is None:
        raise UsageError('--use-ema takes the averaged weights of a training checkpoint: give the checkpoint with '
                         '--weights FILE (weights=... in Python)')
    if add_ema:
        return _create_grafted(model, pretrained, **kwargs)
    spec = parse_spec(resolve_model(model))
    if spec.folder is not None and not spec.folder.is_dir():
        raise WeightsUnavailableError(f'{model}: no such folder; give a folder holding config.json and '
                                      f'model.safetensors (as written by `ema-hub download --to` or publish)')
    if weights is not None:
        state = read_checkpoint(weights, use_ema)
        if 'num_classes' not in kwargs and (classes := _head_size(state, model)) is not None:
            kwargs['num_classes'] = classes  # a fine-tuned file loads as it is
        net = timm.create_model(model, pretrained=False, **kwargs)
        _load_state(net, state, str(weights))
        return net
    with _hub_errors(model):
        return timm.create_model(model, pretrained=pretrained, **kwargs)


def _create_grafted(model: str, pretrained: bool, **kwargs) -> nn.Module:
    spec = parse_spec(model)
    if spec.is_checkpoint or not timm.is_model(spec.name):
        raise UnknownModelError(f'{model} is not a timm model name; --add-ema grafts EMA into a timm model '
                                f'(name or name.tag, e.g. resnet50d.ra4_e3600_r224_in1k)')
    if spec.tag and model not in timm.list_pretrained(f'{spec.name}.*'):
        raise UnknownModelError(f'unknown tag {spec.tag!r} for {spec.name}; see timm.list_pretrained('
                                f'"{spec.name}.*")')
    with _hub_errors(model):
        return timm.create_model('ema_grafted', base=model, pretrained=pretrained, **kwargs)


def load_weights(model: nn.Module, path: PathLike, use_ema: bool = False) -> nn.Module:
    """Load a local weights file (``read_checkpoint``: an EMA checkpoint, or its base's, which gets the warm start)
    into ``model``."""
    return _load_state(model, read_checkpoint(path, use_ema), str(path))


def _load_state(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> nn.Module:
    state = as_variant_state(state, model)
    check_state_dict(state, model, source)
    model.load_state_dict(state)
    return model


# Where the classifier lives when the spec does not name a variant (hf-hub:/local-dir: architectures).
_CLASSIFIERS = ('fc', 'classifier', 'head.fc', 'head')


def _head_size(state: Dict[str, torch.Tensor], model: str) -> Optional[int]:
    """The number of classes a state dict's classifier has, if it has one."""
    spec = parse_spec(model)
    if spec.is_checkpoint:
        names = _CLASSIFIERS
    else:
        names = (timm.models.get_pretrained_cfg(spec.name).classifier or 'fc',)
    head = next((state[f'{n}.weight'] for n in names if f'{n}.weight' in state), None)
    return int(head.shape[0]) if head is not None else None


# Where a checkpoint keeps its weights, in timm's order (timm.models.load_state_dict), then other scripts' names.
_WRAPPERS = ('state_dict', 'model', 'model_state_dict', 'module', 'net')
# timm's averaged copy of the weights (train.py --model-ema), which use_ema takes, as timm's scripts' --use-ema do.
_AVERAGED = ('state_dict_ema', 'model_ema')
# What a checkpoint may pickle besides tensors and plain values: timm's train.py saves its args as a Namespace.
_SAFE_GLOBALS = (argparse.Namespace,)


def read_checkpoint(path: PathLike, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict in a weights file: safetensors, or a PyTorch pickle (a state dict, a timm training checkpoint).

    Pickles are read with ``torch.load(weights_only=True)``: tensors and plain values, argparse.Namespace (the
    ``args`` of timm's train.py) and nothing else, never code. A checkpoint's weights are its ``state_dict``,
    ``model``, ... entry, or with ``use_ema`` its ``state_dict_ema``; DDP and torch.compile prefixes go
    (timm's ``clean_state_dict``). The entry used is logged on ``ema_hub.hub``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f'weights file {path} does not exist; check the path')
    obj = _read_safetensors(path) if _is_safetensors(path) else _load_pickle(path)
    entries = []
    if use_ema:
        entries.append(next((k for k in _AVERAGED if isinstance(obj.get(k), dict)), None))
        if entries[0] is None:
            raise UsageError(f'{path} holds no averaged weights (state_dict_ema: timm saves them when trained with '
                             f'--model-ema); drop --use-ema')
        obj = obj[entries[0]]
    while not any(isinstance(v, torch.Tensor) for v in obj.values()):  # a wrapper: its weights are an entry down
        entries.append(next((k for k in _WRAPPERS if isinstance(obj.get(k), dict)), None))
        if entries[-1] is None:
            raise CorruptWeightsError(f'{path} holds no state dict of tensors; re-save it as a state dict')
        obj = obj[entries[-1]]
    if entries:
        _logger.info('weights: %s, entry %s', path.name, '.'.join(entries))
    return timm.models.clean_state_dict({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})


def _is_safetensors(path: Path) -> bool:
    """By its suffix, or its start (the header's length, then its JSON) for one named otherwise (weights.bin)."""
    with open(path, 'rb') as f:
        return path.suffix == '.safetensors' or f.read(9)[8:] == b'{'


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device='cpu')
    except SafetensorError as e:
        raise CorruptWeightsError(f'{path} is not a valid safetensors file ({e}); it is truncated or corrupted: '
                                  f'export or download it again') from None


def _load_pickle(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(list(_SAFE_GLOBALS)):
            obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        refused = _refused_globals(path)
        if refused:
            raise CorruptWeightsError(
                f'{path} pickles {", ".join(refused)}, which weights-only loading refuses (unpickling it could run '
                f'code); where you trust it, re-save its state dict (torch.save(model.state_dict(), ...))') from None
        raise CorruptWeightsError(
            f'{path} cannot be read as a weights-only PyTorch checkpoint ({type(e).__name__}: '
            f'{str(e).strip().splitlines()[0][:120] if str(e).strip() else "no detail"}); it is truncated or '
            f'corrupted: export or download it again') from None
    if not isinstance(obj, dict):
        raise CorruptWeightsError(f'{path} holds a {type(obj).__name__}, not a state dict; re-save it as a state dict')
    return obj


def _refused_globals(path: Path) -> List[str]:
    """What a PyTorch checkpoint pickles beyond weights-only loading's and ``_SAFE_GLOBALS`` (none if unknown)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # damaged, or not a zip checkpoint: nothing to name
        return []
    return [n for n in names if n not in {f'{g.__module__}.{g.__qualname__}' for g in _SAFE_GLOBALS}]


def label_names(model: nn.Module) -> Optional[List[str]]:
    """The model's class names as its pretrained cfg gives them (ImageNet synsets, folder names), one per class."""
    return _cfg_label_names(model)


def _cfg_label_names(model: nn.Module) -> Optional[List[str]]:
    names = (getattr(model, 'pretrained_cfg', {}) or {}).get('label_names')
    if not names or len(names) != getattr(model, 'num_classes', len(names)):
        return None
    return [str(n) for n in names]


def class_labels(model: nn.Module) -> Optional[List[str]]:
    """Human-readable class names from the model's pretrained cfg (ImageNet descriptions, or folder names)."""
    names = label_names(model)
    if names is None:
        return None
    descriptions = model.pretrained_cfg.get('label_descriptions') or {}
    return [descriptions.get(n, n) for n in names]


def download(model: str, to: Optional[PathLike] = None, force: bool = False) -> Path:
    """Prefetch a model's weights: into the Hugging Face cache (the default), or as a loadable folder.

    With ``to``, the folder holds the model in timm's Hub layout (config.json, model.safetensors, README.md):
    warm tags are mapped first, so ``timm.create_model('local-dir:<to>')`` gives the tag's model offline.
    """
    spec = parse_spec(resolve_model(model))
    if to is not None:
        if spec.repo_id is not None:
            with _hub_errors(model):
                return Path(snapshot_download(spec.repo_id, allow_patterns=_CHECKPOINT_FILES, local_dir=to,
                                              force_download=force))
        if force and spec.folder is None:
            download(model, force=True)
        return save_pretrained(create_model(model), to)
    repo_id, filename = weights_location(model)
    with _hub_errors(model):
        if spec.repo_id is not None:
            return Path(snapshot_download(repo_id, allow_patterns=_CHECKPOINT_FILES, force_download=force))
        return Path(hf_hub_download(repo_id, filename, force_download=force))


def save_pretrained(
        model: nn.Module,
        folder: PathLike,
        repo_id: Optional[str] = None,
        metrics: Optional[Dict[str, object]] = None,
        data_config: Optional[Dict[str, object]] = None,
        label_names: Optional[List[str]] = None,
) -> Path:
    """Write ``model`` in timm's Hub layout (config.json, model.safetensors) with its model card as README.md.

    ``data_config`` (input_size, interpolation, crop_pct, mean, std) and ``label_names`` (one per class) go
    into config.json, replacing those of the model's pretrained cfg. The class names (``label_names``, else the
    model's own) go to config.json's top level, where timm reads them first and transformers' TimmWrapper
    reads them only; an ImageNet head's synsets stay in the pretrained cfg, as in timm's own checkpoints, so
    that transformers names those classes by their descriptions, as ``ema-classify`` does.
    """
    folder = Path(folder)
    names = list(label_names) if label_names is not None else _cfg_label_names(model)
    model_config = None
    if names is not None and not _imagenet_synsets(names):
        model_config = {'label_names': names}
    timm.models.save_for_hf(
        model, folder, model_config=model_config, safe_serialization=True, data_config=data_config)
    follow_umask(folder / _WEIGHTS_FILE)  # safetensors writes it 0600: unreadable to others once published
    _without_duplicate_num_classes(folder / 'config.json')
    variant = model.pretrained_cfg['architecture']
    if variant == GRAFTED:
        card = render_grafted_card(model._model_args['base'], repo_id=repo_id, metrics=metrics and dict(
            metrics, num_classes=model.num_classes))
    elif metrics:
        card = render_card(variant, repo_id=repo_id, weights='trained', metrics=dict(
            metrics, num_classes=model.num_classes))
    else:
        card = render_card(variant, repo_id=repo_id)
    (folder / 'README.md').write_text(card, encoding='utf-8')
    return folder


def _imagenet_synsets(names: List[str]) -> bool:
    """Whether ``names`` are the synsets of the ImageNet subset with that many classes (timm's tables)."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({'num_classes': len(names)})
    return bool(subset) and ImageNetInfo(subset).label_names() == names


def _without_duplicate_num_classes(config: Path) -> None:
    """Drop ``num_classes`` from config.json's ``model_args``: transformers' TimmWrapper passes the class count
    itself and then ``model_args`` as keywords, so the folder loaded in neither its pipeline nor AutoModel.
    timm reads the count from the top level, where it stays."""
    data = json.loads(config.read_text(encoding='utf-8'))
    if isinstance(data.get('model_args'), dict) and data['model_args'].pop('num_classes', None) is not None:
        config.write_text(json.dumps(data, indent=2) + '\n', encoding='utf-8')


def publish(
        model: Union[str, nn.Module],
        repo_id: str,
        *,
        dry_run_dir: Optional[PathLike] = None,
        token: Optional[str] = None,
        private: bool = False,
        metrics: Optional[Dict[str, object]] = None,
) -> str:
    """Publish a model (a spec or a module) to ``repo_id`` in timm's Hub layout; with ``dry_run_dir``, stop at the folder.

    A ``local-dir:`` folder that already holds a card (a fine-tuning result, say) is published as it is, so its
    card keeps the accuracy measured there. Returns the folder path for a dry run, else the URL of the commit.
    """
    if dry_run_dir is not None:
        return str(_publishable_folder(model, Path(dry_run_dir), repo_id, metrics))
    with tempfile.TemporaryDirectory() as tmp, _hub_errors(f'{HF_HUB}{repo_id}'):
        _publishable_folder(model, Path(tmp), repo_id, metrics)
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True, private=private)
        commit = api.upload_folder(folder_path=tmp, repo_id=repo_id, commit_message='Upload ema-hub checkpoint')
        return str(getattr(commit, 'commit_url', commit))


def _publishable_folder(model: Union[str, nn.Module], folder: Path, repo_id: str, metrics) -> Path:
    """Write what publish uploads into ``folder``: a card-carrying local-dir as it is, else save_pretrained's layout."""
    source = parse_spec(model).folder if isinstance(model, str) else None
    if source is not None and metrics is None:
        if (source / 'README.md').is_file():
            create_model(model)  # check that it loads before publishing it
            folder.mkdir(parents=True, exist_ok=True)
            for name in _CHECKPOINT_FILES + ['metrics.json']:
                if (source / name).is_file() and (source / name).resolve() != (folder / name).resolve():
                    shutil.copyfile(source / name, folder / name)
            return folder
    net = create_model(model) if isinstance(model, str) else model
    return save_pretrained(net, folder, repo_id=repo_id, metrics=metrics)


# The paper's code names the attention module freely (ema, attention, ...); timm's slot is `se`.
_PAPER_ATTENTION = re.compile(r'^(?P<block>.+)\.(?P<attn>[^.]+)\.(?P<part>gn|conv1x1|conv3x3)\.(?P<param>weight|bias)$')
_SE_KEY = re.compile(r'^(?P<block>.+)\.se\.(?P<rest>(?![01]\.).+)$')  # a squeeze-excitation key, not yet se.0/se.1


def convert_checkpoint(source: PathLike, variant: str, out: PathLike, use_ema: bool = False) -> Dict[str, object]:
    """Convert a checkpoint of the paper's code or of timm's train.py (gn/conv1x1/conv3x3 attention keys) to
    safetensors for ``variant``.

    The weights are read as ``read_checkpoint`` reads them (weights only, never code; the ``state_dict`` entry, or
    ``state_dict_ema`` with ``use_ema``; DDP's ``module.`` prefix removed; metadata such as train.py's ``args``
    left out); the attention module's keys (``ema.*`` in the paper's timm fork) are renamed to where the variant
    has EMA: timm's ``se`` slot, or ``se.1`` after a block's own squeeze-excitation (then at ``se.0``). Unknown, missing
    and mismatched keys are reported by name.
    """
    source = Path(source)
    model_name = resolve_model(variant).split('.', 1)[0]
    state = read_checkpoint(source, use_ema)
    classes = _head_size(state, model_name)
    model = timm.create_model(model_name, pretrained=False, **({'num_classes': classes} if classes else {}))
    # Where each block's EMA sits: timm's attention slot `se`, or `se.1` after the block's own SE (at `se.0`).
    ema_at = {name.rsplit('.se', 1)[0]: name for name, m in model.named_modules() if isinstance(m, EMA)}
    behind_se = {block for block, name in ema_at.items() if name.endswith('.se.1')}
    renamed = 0
    converted = {}
    for key, tensor in state.items():
        match = _PAPER_ATTENTION.match(key)
        block = match.group('block') if match else None
        if match and block in ema_at and key != f"{ema_at[block]}.{match.group('part')}.{match.group('param')}":
            key = f"{ema_at[block]}.{match.group('part')}.{match.group('param')}"
            renamed += 1
        elif (se := _SE_KEY.match(key)) and se.group('block') in behind_se:
            key = f"{se.group('block')}.se.0.{se.group('rest')}"
        converted[key] = tensor.contiguous()
    check_state_dict(converted, model, str(source))
    out = Path(out)
    with atomic_path(out) as tmp:
        safetensors.torch.save_file(converted, str(tmp), metadata={'format': 'pt', 'architecture': model_name})
    return {'out': str(out), 'variant': model_name, 'tensors': len(converted), 'renamed': renamed,
            'num_classes': model.num_classes}


def list_variants(all_tags: bool = False) -> List[Dict[str, object]]:
    """What ``ema-hub list`` shows: a row per variant (its default tag), or with ``all_tags`` per variant and tag,
    with its size, the base tag's published ImageNet-1k top-1 (None where timm's results have none) and whether
    its weights are cached."""
    rows = []
    for name, variant in VARIANTS.items():
        for i, tag in enumerate(variant.base_tags[:None if all_tags else 1]):
            spec = f'{name}.warm_{tag}'
            result = BASE_RESULTS.get(f'{variant.base}.{tag}')
            rows.append({
                'model': spec, 'default': i == 0, 'base': variant.base, 'params_m': variant.params_m,
                'gmacs': variant.gmacs, 'base_top1': result[1] if result else None, 'cached': _cached_or_not(spec),
            })
    return rows


def describe(model: str) -> Dict[str, object]:
    """What ``ema-hub info`` shows of a spec: architecture, classes, features, parameters, whether it is cached, its
    pretrained cfg (label names summarised), the data config of its eval transform and its card's first paragraph."""
    net = create_model(model, pretrained=False)
    cfg = dict(net.pretrained_cfg)
    spec = parse_spec(model)
    return {
        'model': model, 'architecture': cfg.get('architecture'), 'num_classes': net.num_classes,
        'num_features': net.num_features, 'params_m': round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
        'cached': None if spec.folder is not None else _cached_or_not(model),
        'pretrained_cfg': _summarized_cfg(cfg), 'data_config': timm.data.resolve_data_config({}, model=net),
        'card_summary': card_summary(_card_text(model, cfg)),
    }


def _card_text(model: str, cfg: Dict[str, object]) -> str:
    """The card of a spec's weights: a checkpoint's own README.md, else the variant's warm card ('' if neither)."""
    spec = parse_spec(model)
    if spec.folder is not None:
        card = spec.folder / 'README.md'
        return card.read_text(encoding='utf-8') if card.is_file() else ''
    if spec.repo_id is not None:
        with contextlib.suppress(Exception):  # a repo without a card: nothing to summarise
            return Path(hf_hub_download(spec.repo_id, 'README.md')).read_text(encoding='utf-8')
        return ''
    variant = str(cfg.get('architecture', '')).split('.', 1)[0]
    return render_card(variant) if variant in VARIANTS else ''


def _cached_or_not(model: str) -> bool:
    try:
        return is_cached(model)
    except Exception:  # an odd cache layout must not break a listing
        return False


def _summarized_cfg(cfg: Dict[str, object]) -> Dict[str, object]:
    """The pretrained cfg without empty fields, its label names as a count and the first three."""
    cfg = {k: v for k, v in cfg.items() if v is not None}
    names = cfg.pop('label_names', None)
    cfg.pop('label_descriptions', None)
    if names:
        cfg['label_names'] = f'{len(names)} names ({", ".join(map(str, list(names)[:3]))}, ...)'
    return cfg

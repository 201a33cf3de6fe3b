"""Weights files read and converted: ``read_checkpoint`` (safetensors, or a PyTorch pickle read weights-only) and
``convert_checkpoint``, which renames the paper's or timm's train.py's attention keys to the variant's."""
import argparse
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional

import safetensors.torch
import timm
import torch
from safetensors import SafetensorError

from .errors import CorruptWeightsError, UsageError, WeightsUnavailableError
from .files import atomic_path
from .lookup import resolve_model
from .placement import ema_sites, move_attention_keys
from .pretrained import check_state_dict
from .specs import PathLike, parse_spec

__all__ = ['read_checkpoint', 'convert_checkpoint', 'head_size']

_logger = logging.getLogger(__name__)

# Where the classifier lives when the spec does not name a variant (hf-hub:/local-dir: architectures).
_CLASSIFIERS = ('fc', 'classifier', 'head.fc', 'head')


def head_size(state: Dict[str, torch.Tensor], model: str) -> Optional[int]:
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
    (timm's ``clean_state_dict``). The entry used is logged on ``ema_hub.checkpoints``.
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


# The paper's code names the attention module freely (ema, attention, ...); timm's slot is `se`.
_PAPER_ATTENTION = re.compile(r'^(?P<block>.+)\.(?P<attn>[^.]+)\.(?P<part>gn|conv1x1|conv3x3)\.(?P<param>weight|bias)$')


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
    classes = head_size(state, model_name)
    model = timm.create_model(model_name, pretrained=False, **({'num_classes': classes} if classes else {}))
    ema_at = {site.block: site for site in ema_sites(model)}
    renamed = 0
    converted = {}
    for key, tensor in state.items():
        match = _PAPER_ATTENTION.match(key)
        site = ema_at.get(match.group('block')) if match else None
        if site and key != f"{site.name}.{match.group('part')}.{match.group('param')}":
            key = f"{site.name}.{match.group('part')}.{match.group('param')}"
            renamed += 1
        converted[key] = tensor.contiguous()
    for site in ema_at.values():
        if site.joined_attention:
            move_attention_keys(converted, site.block)
    check_state_dict(converted, model, str(source))
    out = Path(out)
    with atomic_path(out) as tmp:
        safetensors.torch.save_file(converted, str(tmp), metadata={'format': 'pt', 'architecture': model_name})
    return {'out': str(out), 'variant': model_name, 'tensors': len(converted), 'renamed': renamed,
            'num_classes': model.num_classes}

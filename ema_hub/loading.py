"""Models built and loaded: ``create_model`` for any model spec (or a local weights file), ``load_weights`` into a
built model, with errors callers can act on."""
from typing import Dict, Optional

import timm
import torch
from torch import nn

from .checkpoints import head_size, read_checkpoint
from .errors import UnknownModelError, UsageError, WeightsUnavailableError
from .lookup import hub_errors, resolve_model
from .pretrained import as_variant_state, check_state_dict
from .specs import PathLike, parse_spec

__all__ = ['create_model', 'load_weights']


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
        if 'num_classes' not in kwargs and (classes := head_size(state, model)) is not None:
            kwargs['num_classes'] = classes  # a fine-tuned file loads as it is
        net = timm.create_model(model, pretrained=False, **kwargs)
        _load_state(net, state, str(weights))
        return net
    with hub_errors(model):
        return timm.create_model(model, pretrained=pretrained, **kwargs)


def _create_grafted(model: str, pretrained: bool, **kwargs) -> nn.Module:
    spec = parse_spec(model)
    if spec.is_checkpoint or not timm.is_model(spec.name):
        raise UnknownModelError(f'{model} is not a timm model name; --add-ema grafts EMA into a timm model '
                                f'(name or name.tag, e.g. resnet50d.ra4_e3600_r224_in1k)')
    if spec.tag and model not in timm.list_pretrained(f'{spec.name}.*'):
        raise UnknownModelError(f'unknown tag {spec.tag!r} for {spec.name}; see timm.list_pretrained('
                                f'"{spec.name}.*")')
    with hub_errors(model):
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


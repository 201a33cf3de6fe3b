"""Pretrained tags: their timm cfgs, generated from the registry, and the warm-start checkpoint mapping.

A warm tag (``resnet50_ema.warm_a1_in1k``) fetches timm's own safetensors checkpoint of the base
(``timm/resnet50.a1_in1k``) through huggingface_hub and maps it into the variant so that its logits equal
the base's: every EMA layer starts as x -> x/2 (gn and conv3x3 zero: both softmaxes uniform, every gate
sigmoid(0)) and the factor 2 is folded into the layer that feeds it. conv1x1 keeps its random init; it
receives gradient as soon as gn.weight leaves zero.
"""
import functools
from typing import Collection, Dict, List, Optional, Set, Tuple

import torch
from torch import nn
from timm.data import ImageNetInfo, infer_imagenet_subset
from timm.models import get_pretrained_cfg

from .errors import CheckpointKeysError, ShapeMismatchError
from .layers import EMA
from .placement import ema_sites, move_attention_keys
from .registry import VARIANTS, Variant
from .specs import CHECKPOINT_SOURCES

__all__ = ['pretrained_cfgs', 'checkpoint_filter_fn', 'as_variant_state', 'half_state', 'warm_start_state_dict',
           'check_state_dict', 'loads_weights', 'names_checkpoint', 'without_foreign_labels', 'label_names',
           'class_labels']

# cfg fields that say where the base's weights live, replaced by the warm tag's own.
_SOURCE_FIELDS = ('url', 'file', 'state_dict', 'source', 'architecture', 'tag', 'hf_hub_filename')
# cfg fields that describe the classes of the cfg's head (timm's save_for_hf drops the same for a new head).
_LABEL_FIELDS = ('label_names', 'label_descriptions', 'label_offset')


@functools.lru_cache(maxsize=None)
def _imagenet_labels(subset: Optional[str]) -> Dict[str, object]:
    """The label names and descriptions of an ImageNet head (timm's tables: 1k, 12k, 21k, 22k); none for others."""
    if not subset:
        return {}
    info = ImageNetInfo(subset)
    names = info.label_names()
    return {'label_names': names, 'label_descriptions': {n: info.label_name_to_description(n) for n in names}}


def _warm_cfg(variant: Variant, tag: str) -> Dict[str, object]:
    """The cfg of the warm tag ``warm_<tag>``: the base tag's own (data config, head size, labels, license) with the
    base checkpoint's safetensors as its weights."""
    base = get_pretrained_cfg(f'{variant.base}.{tag}').to_dict()
    hub_id = f'timm/{variant.base}.{tag}'
    labels = _imagenet_labels(infer_imagenet_subset(base) if base.get('num_classes') else None)
    for key in _SOURCE_FIELDS:
        base.pop(key, None)
    return dict(
        base,
        hf_hub_id=hub_id,
        hf_hub_filename='model.safetensors',  # safetensors only: never fall back to a pickle
        paper_ids='arXiv:2305.13563',
        description=f'Warm start from {hub_id}: EMA layers start as x/2 with the factor 2 folded into the layer '
                    f'next to them, so the model computes the base\'s function.',
        **labels,
    )


def pretrained_cfgs(family: str) -> Dict[str, Dict[str, object]]:
    """``{'<variant>.warm_<tag>': cfg}`` for every variant of ``family`` and every pretrained tag of its base, the
    default tag first (timm's default for the variant)."""
    return {f'{v.name}.warm_{tag}': _warm_cfg(v, tag)
            for v in VARIANTS.values() if v.family == family for tag in v.base_tags}


def half_state(ema: EMA) -> Dict[str, torch.Tensor]:
    """A state for ``ema`` in which it computes x/2: gn and conv3x3 zero (both softmaxes uniform, every gate
    sigmoid(0)); conv1x1 keeps its random init, and gets gradient as soon as gn.weight moves."""
    return {key: value.detach().clone() if key.startswith('conv1x1.') else torch.zeros_like(value)
            for key, value in ema.state_dict().items()}


def warm_start_state_dict(base_state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a base checkpoint into ``model`` (an EMA variant, or a model ``add_ema`` grafted at a family's sites) so
    that it computes the base's function."""
    state = dict(base_state)
    for site in ema_sites(model):
        if site.joined_attention:
            move_attention_keys(state, site.block)
        for key in site.fold_keys(state):
            state[key] = state[key] * 2
        ema = model.get_submodule(site.name)
        state.update((f'{site.name}.{key}', value) for key, value in half_state(ema).items())
    return state


def as_variant_state(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """A checkpoint in the variant's keys: an EMA checkpoint as it is, a base checkpoint through the warm start."""
    has_ema = any(k.endswith(('.gn.weight', '.conv3x3.weight')) for k in state_dict)
    return state_dict if has_ema else warm_start_state_dict(state_dict, model)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's pretrained filter: base checkpoints (no EMA keys) get the warm start; EMA checkpoints pass as they are.

    The result is checked against the model (``check_state_dict``), leaving out what timm's loader adapts
    after this filter: a classifier of another size, a first convolution for other input channels.
    """
    state = as_variant_state(state_dict, model)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    # A feature extractor without the classifier (timm's EfficientNetFeatures) loads non-strictly: the head's
    # keys are the checkpoint's own, not a mismatch.
    check_state_dict(state, model, cfg.get('hf_hub_id') or cfg.get('file') or 'the checkpoint', _adapted_by_timm(model),
                     allow_unknown=not hasattr(model, 'num_classes'))
    return state


def _adapted_by_timm(model: nn.Module) -> Set[str]:
    """Keys timm's ``load_pretrained`` replaces or drops after the filter: a classifier of another size, a first
    convolution for other input channels."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    adapted = set()
    if getattr(model, 'num_classes', None) != cfg.get('num_classes'):
        adapted.update(f'{name}.{p}' for name in _names(cfg.get('classifier')) for p in ('weight', 'bias'))
    in_chans = (cfg.get('input_size') or (3,))[0]
    adapted.update(f'{name}.weight' for name in _names(cfg.get('first_conv'))
                   if getattr(model.get_submodule(name), 'in_channels', in_chans) != in_chans)
    return adapted


def _names(value) -> Tuple[str, ...]:
    """A cfg field that holds one module name or several."""
    return (value,) if isinstance(value, str) else tuple(value or ())


def check_state_dict(state: Dict[str, torch.Tensor], model: nn.Module, source: str,
                     adapted: Collection[str] = (), allow_unknown: bool = False) -> None:
    """Raise ShapeMismatchError for the first tensor that does not fit ``model``, CheckpointKeysError for unknown or
    missing keys. ``adapted``: keys the loader itself resizes or drops (a new head, a stem for other channels);
    ``allow_unknown``: keys the model does not have are left out (a non-strict load)."""
    expected = model.state_dict()
    for key, tensor in expected.items():  # in model order, so "first" means first in the network
        if key in state and state[key].shape != tensor.shape and key not in adapted:
            raise ShapeMismatchError(key, state[key].shape, tensor.shape, source)
    unknown = set() if allow_unknown else set(state) - set(expected) - set(adapted)
    # BatchNorm's step counters carry no weights; checkpoints often leave them out.
    missing = {k for k in set(expected) - set(state) - set(adapted) if not k.endswith('num_batches_tracked')}
    if unknown or missing:
        arch = getattr(model, 'pretrained_cfg', {}).get('architecture', 'the model')
        raise CheckpointKeysError(source, arch, unknown, missing)


def without_foreign_labels(model: nn.Module) -> nn.Module:
    """``model`` with its cfg's class names dropped unless it has the head they name: a head of another size, none
    (num_classes=0) or a feature extractor has other classes, which timm's tools would otherwise label with them."""
    cfg = getattr(model, 'pretrained_cfg', None)
    classes = getattr(model, 'num_classes', None)
    if cfg and (not classes or classes != cfg.get('num_classes')):
        for key in _LABEL_FIELDS:
            cfg.pop(key, None)  # in place: default_cfg is the same dict
    return model


def loads_weights(pretrained: bool, pretrained_cfg) -> bool:
    """Whether a builder loads weights: when asked, and always for ``hf-hub:``/``local-dir:`` specs.

    Those specs name a checkpoint, so ``timm.create_model('hf-hub:<repo>')`` loads its weights without
    ``pretrained=True`` (for timm's own models that flag is needed).
    """
    return bool(pretrained) or names_checkpoint(pretrained_cfg)


def names_checkpoint(pretrained_cfg) -> bool:
    """Whether a pretrained cfg (a dict or timm's PretrainedCfg, or None) comes from an ``hf-hub:``/``local-dir:``
    spec: its ``source`` is one of ``CHECKPOINT_SOURCES``."""
    source = (pretrained_cfg.get('source') if isinstance(pretrained_cfg, dict)
              else getattr(pretrained_cfg, 'source', None))
    return source in CHECKPOINT_SOURCES


def label_names(model: nn.Module) -> Optional[List[str]]:
    """The model's class names as its pretrained cfg gives them (ImageNet synsets, folder names), one per class."""
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

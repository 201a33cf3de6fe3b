"""Models built by grafting: ``build_grafted_variant`` for the registry's graft-built variants, and ``ema_grafted``:
any timm model with EMA grafted in by ``ema_hub.add_ema``, as a timm architecture.

``timm.create_model('ema_grafted', base='convnext_tiny.fb_in22k_ft_in1k', pretrained=True)`` builds the base
with its pretrained weights and grafts EMA (the function unchanged); ``after`` and ``factor`` are add_ema's.
A grafted model saved in timm's Hub layout (``ema-hub finetune --add-ema``) names this architecture and its
base in config.json, so the folder loads with ``local-dir:``/``hf-hub:``, in ``ema-classify`` and in
transformers: the base is built without weights, grafted, and the folder's weights loaded.
"""
from typing import Optional, Sequence

import timm
from timm.models import build_model_with_cfg, register_model
from torch import nn

from ..graft import add_ema, graft_family
from ..pretrained import checkpoint_filter_fn, loads_weights, names_checkpoint, without_foreign_labels
from ..registry import EMA_FACTOR, VARIANTS

ARCHITECTURE = 'ema_grafted'


def build_grafted_variant(variant: str, pretrained: bool = False, default_feature_cfg=None,
                          **kwargs) -> nn.Module:
    """A registry variant built as its timm base with EMA grafted at the family's placement (``graft_family``);
    its pretrained weights go through the warm start (``checkpoint_filter_fn``)."""
    base = VARIANTS[variant].base

    def build(**model_kwargs) -> nn.Module:
        model = timm.create_model(base, **model_kwargs)
        graft_family(model)
        return model

    pretrained = loads_weights(pretrained, kwargs.get('pretrained_cfg'))
    feature_cfg = dict(default_feature_cfg or {}, **kwargs.pop('feature_cfg', None) or {})  # the caller's win
    return without_foreign_labels(build_model_with_cfg(
        build, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg, **kwargs))


@register_model
def ema_grafted(pretrained: bool = False, base: str = 'resnet50', after: Optional[Sequence[str]] = None,
                factor: int = EMA_FACTOR, **kwargs) -> nn.Module:
    """A timm model (``base``, with a pretrained tag to start from) with EMA grafted in by ``add_ema``."""
    pretrained_cfg = kwargs.pop('pretrained_cfg', None)
    overlay = kwargs.pop('pretrained_cfg_overlay', None)
    kwargs.pop('cache_dir', None)
    after = list(after) if after is not None else None
    if names_checkpoint(pretrained_cfg):  # a saved grafted model: its weights have EMA's
        def graft(**model_kwargs) -> nn.Module:
            return add_ema(timm.create_model(base, **model_kwargs), after, factor)
        return without_foreign_labels(build_model_with_cfg(
            graft, ARCHITECTURE, loads_weights(pretrained, pretrained_cfg), pretrained_cfg=pretrained_cfg,
            pretrained_cfg_overlay=overlay, **kwargs))
    # the base's own weights, then the graft, which keeps their function
    model = add_ema(timm.create_model(base, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs),
                    after, factor)
    model.pretrained_cfg = dict(model.pretrained_cfg, architecture=ARCHITECTURE)
    model.default_cfg = model.pretrained_cfg
    return without_foreign_labels(model)

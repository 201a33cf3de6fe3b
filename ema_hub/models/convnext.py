"""ConvNeXt with EMA in every block, each the base as timm builds it with EMA grafted at the family's placement
(``ema_hub.placement.FAMILIES['convnext']``).
"""
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..pretrained import pretrained_cfgs
from .grafted import build_grafted_variant


def _create_convnext_ema(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    features = dict(out_indices=(0, 1, 2, 3), flatten_sequential=True)  # as timm builds ConvNeXt's
    return build_grafted_variant(variant, pretrained, default_feature_cfg=features, **kwargs)


default_cfgs = generate_default_cfgs(pretrained_cfgs('convnext'))


@register_model
def convnext_tiny_ema(pretrained: bool = False, **kwargs) -> nn.Module:
    """ConvNeXt-Tiny with EMA in every block."""
    return _create_convnext_ema('convnext_tiny_ema', pretrained, **kwargs)


@register_model
def convnext_small_ema(pretrained: bool = False, **kwargs) -> nn.Module:
    """ConvNeXt-Small with EMA in every block."""
    return _create_convnext_ema('convnext_small_ema', pretrained, **kwargs)


@register_model
def convnext_base_ema(pretrained: bool = False, **kwargs) -> nn.Module:
    """ConvNeXt-Base with EMA in every block."""
    return _create_convnext_ema('convnext_base_ema', pretrained, **kwargs)

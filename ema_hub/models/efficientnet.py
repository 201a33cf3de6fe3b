"""Variants of timm's EfficientNet builder: MobileNetV2, MobileNetV3 and EfficientNet, each the base as timm builds
it with EMA grafted where the paper's own timm fork places it (``ema_hub.placement.FAMILIES['efficientnet']``).
Expanded widths the factor does not divide (240, 672, ...) follow ``ema_hub.layers.ema_groups``.
"""
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..pretrained import pretrained_cfgs
from .grafted import build_grafted_variant


def _create_effnet_ema(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    return build_grafted_variant(variant, pretrained, default_feature_cfg=dict(flatten_sequential=True), **kwargs)


default_cfgs = generate_default_cfgs(pretrained_cfgs('efficientnet'))


@register_model
def mobilenetv2_100_ema(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNet-V2 1.0 with EMA in its 13 inverted residuals wider than 144."""
    return _create_effnet_ema('mobilenetv2_100_ema', pretrained, **kwargs)


@register_model
def mobilenetv2_140_ema(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNet-V2 1.4 with EMA in its 15 inverted residuals wider than 144."""
    return _create_effnet_ema('mobilenetv2_140_ema', pretrained, **kwargs)


@register_model
def mobilenetv3_large_100_ema(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNet-V3 Large 1.0 with EMA in its inverted residuals wider than 144."""
    return _create_effnet_ema('mobilenetv3_large_100_ema', pretrained, **kwargs)


@register_model
def efficientnet_b0_ema(pretrained: bool = False, **kwargs) -> nn.Module:
    """EfficientNet-B0 with EMA in its inverted residuals wider than 144."""
    return _create_effnet_ema('efficientnet_b0_ema', pretrained, **kwargs)


@register_model
def efficientnet_b1_ema(pretrained: bool = False, **kwargs) -> nn.Module:
    """EfficientNet-B1 with EMA in its inverted residuals wider than 144."""
    return _create_effnet_ema('efficientnet_b1_ema', pretrained, **kwargs)


@register_model
def efficientnet_b2_ema(pretrained: bool = False, **kwargs) -> nn.Module:
    """EfficientNet-B2 with EMA in its inverted residuals wider than 144."""
    return _create_effnet_ema('efficientnet_b2_ema', pretrained, **kwargs)


@register_model
def efficientnet_b3_ema(pretrained: bool = False, **kwargs) -> nn.Module:
    """EfficientNet-B3 with EMA in its inverted residuals wider than 144."""
    return _create_effnet_ema('efficientnet_b3_ema', pretrained, **kwargs)

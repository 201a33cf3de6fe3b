"""MobileNetV2 with EMA in every inverted residual.

EMA goes where timm puts squeeze-excitation: after the depthwise convolution, before the pointwise-linear
projection. timm's MobileNetV2 has no SE, so the arch definition below is timm's own with an SE option
(`se0.25`, the ratio is unused by EMA) on every inverted-residual stage, and EMA as the SE layer.
Expanded widths the factor does not divide (144, ...) follow ``ema_hub.layers.ema_groups``.
"""
from functools import partial

from torch import nn
from timm.models import generate_default_cfgs, register_model
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models.efficientnet import EfficientNet, _create_effnet

from ..layers import EMA
from ..pretrained import checkpoint_filter_fn, loads_weights, pretrained_cfgs
from ..registry import VARIANTS

# timm's MobileNetV2 definition (efficientnet._gen_mobilenet_v2) with EMA on the inverted residuals.
_ARCH_DEF = [
    ['ds_r1_k3_s1_c16'],
    ['ir_r2_k3_s2_e6_c24_se0.25'],
    ['ir_r3_k3_s2_e6_c32_se0.25'],
    ['ir_r4_k3_s2_e6_c64_se0.25'],
    ['ir_r3_k3_s1_e6_c96_se0.25'],
    ['ir_r3_k3_s2_e6_c160_se0.25'],
    ['ir_r1_k3_s1_e6_c320_se0.25'],
]


def _ema_se(channels: int, act_layer=None, device=None, dtype=None) -> EMA:
    """EMA in timm's SE slot: the block passes its activation, which EMA has no use for."""
    return EMA(channels, device=device, dtype=dtype)


def _create_mobilenetv2_ema(variant: str, pretrained: bool = False, **kwargs) -> EfficientNet:
    round_chs_fn = partial(round_channels, multiplier=VARIANTS[variant].arch['channel_multiplier'])
    model_kwargs = dict(
        block_args=decode_arch_def(_ARCH_DEF),
        num_features=max(1280, round_chs_fn(1280)),
        stem_size=32,
        round_chs_fn=round_chs_fn,
        se_layer=_ema_se,
        norm_layer=kwargs.pop('norm_layer', None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=resolve_act_layer(kwargs, 'relu6'),
        **kwargs,
    )
    # timm's _create_effnet handles features_only the timm way; the filter maps base checkpoints.
    pretrained = loads_weights(pretrained, kwargs.get('pretrained_cfg'))
    return _create_effnet(variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **model_kwargs)


default_cfgs = generate_default_cfgs(pretrained_cfgs('mobilenetv2'))


@register_model
def mobilenetv2_100_ema(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNet-V2 1.0 with EMA in every inverted residual."""
    return _create_mobilenetv2_ema('mobilenetv2_100_ema', pretrained, **kwargs)


@register_model
def mobilenetv2_140_ema(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNet-V2 1.4 with EMA in every inverted residual."""
    return _create_mobilenetv2_ema('mobilenetv2_140_ema', pretrained, **kwargs)

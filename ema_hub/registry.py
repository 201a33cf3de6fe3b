"""The one table of EMA variants: the single source of truth for models, pretrained tags, listings and cards.

Every variant is its timm base architecture with EMA added at its family's placement (``FAMILIES``). Model
registration (``ema_hub.models``), the pretrained cfgs and warm-start mapping (``ema_hub.pretrained``),
the model cards (``ema_hub.cards``) and the CLI's listing are all generated from ``VARIANTS``.
"""
from dataclasses import dataclass, field
from typing import Dict, Mapping, Tuple

from .errors import UnknownModelError

__all__ = ['Family', 'FAMILIES', 'Variant', 'VARIANTS', 'EMA_FACTOR', 'get_variant']

# The paper's group count, used by every variant.
EMA_FACTOR = 32

@dataclass(frozen=True)
class Family:
    """Where EMA sits in an architecture family, and which layer the warm start scales by 2."""
    placement: str                # in words: builders' docstrings, cards, the placement tests
    fold_into: Tuple[str, ...]    # the layer feeding (or fed by) EMA, first one a block has
    fold_words: str               # the same, in words for the cards


FAMILIES = {
    'resnet': Family(
        placement='after the last BatchNorm of every residual block (bn2 in basic blocks, bn3 in bottlenecks), '
                  'before the residual add: where timm places channel attention',
        fold_into=('bn3', 'bn2'),
        fold_words='the BatchNorm before it (`bn3` in bottlenecks, `bn2` in basic blocks, weight and bias)',
    ),
    'efficientnet': Family(
        placement='after squeeze-excitation (or the depthwise convolution, in blocks without it) and before the '
                  'pointwise projection, in every inverted residual whose expanded width exceeds 144 and every '
                  'depthwise-separable block whose width exceeds 320: the rule of the paper\'s own timm fork',
        fold_into=('conv_pwl', 'conv_pw'),
        fold_words='the pointwise projection after it (`conv_pwl` in inverted residuals, `conv_pw` in '
                   'depthwise-separable blocks, weight)',
    ),
}


@dataclass(frozen=True)
class Variant:
    """One EMA-augmented timm architecture and the facts its cards and warm-start tag need."""
    name: str
    base: str                   # timm architecture it augments
    family: str                 # key of FAMILIES; picks the builder
    arch: Mapping[str, object]  # builder arguments (the base's own, as in its timm entry point)
    base_tag: str               # the base's timm pretrained tag the warm start comes from
    base_top1: float            # that tag's ImageNet-1k top-1 at its default resolution (timm results csv)
    base_top5: float
    params_m: float             # parameters, millions, of the 1000-class variant (a test recounts them)
    base_params_m: float
    gmacs: float                # GMACs at 224x224 of the paper's form of EMA (a test recounts them)
    base_gmacs: float
    description: str = field(default='')

    @property
    def warm_tag(self) -> str:
        return f'warm_{self.base_tag}'

    @property
    def base_hub_id(self) -> str:
        """The Hub repo of the base checkpoint, as timm publishes it."""
        return f'timm/{self.base}.{self.base_tag}'

    @property
    def placement(self) -> str:
        return FAMILIES[self.family].placement


def _resnet(name, base, layers, block, base_tag, top1, top5, params, base_params, gmacs, base_gmacs, **extra):
    return Variant(
        name=name, base=base, family='resnet', arch=dict(block=block, layers=layers, **extra),
        base_tag=base_tag, base_top1=top1, base_top5=top5, params_m=params, base_params_m=base_params,
        gmacs=gmacs, base_gmacs=base_gmacs,
    )


def _effnet(name, base, base_tag, top1, top5, params, base_params, gmacs, base_gmacs):
    """A variant of timm's EfficientNet builder: the base as timm builds it, EMA grafted at the family's placement."""
    return Variant(
        name=name, base=base, family='efficientnet', arch={},
        base_tag=base_tag, base_top1=top1, base_top5=top5, params_m=params, base_params_m=base_params,
        gmacs=gmacs, base_gmacs=base_gmacs,
    )


_TABLE: Tuple[Variant, ...] = (
    # name, base, layers, block, base tag, top-1, top-5, params (M) ema/base, GMACs ema/base
    _resnet('resnet18_ema', 'resnet18', (2, 2, 2, 2), 'basic', 'a1_in1k', 71.504, 90.086, 11.70, 11.69, 1.84, 1.81),
    _resnet('resnet34_ema', 'resnet34', (3, 4, 6, 3), 'basic', 'a1_in1k', 76.420, 92.896, 21.81, 21.80, 3.73, 3.66),
    _resnet('resnet50_ema', 'resnet50', (3, 4, 6, 3), 'bottleneck', 'a1_in1k', 80.382, 94.598, 25.76, 25.56, 5.04, 4.09),
    _resnet('resnet101_ema', 'resnet101', (3, 4, 23, 3), 'bottleneck', 'a1h_in1k', 81.950, 95.760,
            44.92, 44.55, 9.76, 7.80),
    _resnet('resnet152_ema', 'resnet152', (3, 8, 36, 3), 'bottleneck', 'a1h_in1k', 82.818, 96.124,
            60.71, 60.19, 14.47, 11.51),
    _resnet('resnext50_32x4d_ema', 'resnext50_32x4d', (3, 4, 6, 3), 'bottleneck', 'a1h_in1k', 81.140, 95.320,
            25.23, 25.03, 5.18, 4.23, cardinality=32, base_width=4),
    _resnet('resnet50d_ema', 'resnet50d', (3, 4, 6, 3), 'bottleneck', 'ra4_e3600_r224_in1k', 80.956, 95.380,
            25.77, 25.58, 5.28, 4.33, stem_width=32, stem_type='deep', avg_down=True),
    _resnet('resnet101d_ema', 'resnet101d', (3, 4, 23, 3), 'bottleneck', 'ra2_in1k', 82.254, 96.070,
            44.94, 44.57, 10.00, 8.04, stem_width=32, stem_type='deep', avg_down=True),
    _resnet('wide_resnet50_2_ema', 'wide_resnet50_2', (3, 4, 6, 3), 'bottleneck', 'racm_in1k', 81.466, 95.544,
            69.08, 68.88, 12.35, 11.40, base_width=128),
    _effnet('mobilenetv2_100_ema', 'mobilenetv2_100', 'ra_in1k',
            72.910, 91.000, 3.55, 3.50, 0.44, 0.30),
    _effnet('mobilenetv2_140_ema', 'mobilenetv2_140', 'ra_in1k',
            76.528, 93.008, 6.22, 6.11, 0.94, 0.58),
    _effnet('mobilenetv3_large_100_ema', 'mobilenetv3_large_100', 'ra4_e3600_r224_in1k',
            76.310, 92.842, 5.52, 5.48, 0.30, 0.22),
    _effnet('efficientnet_b0_ema', 'efficientnet_b0', 'ra4_e3600_r224_in1k',
            78.568, 94.340, 5.36, 5.29, 0.58, 0.39),
    _effnet('efficientnet_b1_ema', 'efficientnet_b1', 'ra4_e3600_r240_in1k',
            80.404, 95.152, 7.93, 7.79, 0.88, 0.57),
    _effnet('efficientnet_b2_ema', 'efficientnet_b2', 'ra_in1k',
            79.324, 94.582, 9.28, 9.11, 1.06, 0.66),
    _effnet('efficientnet_b3_ema', 'efficientnet_b3', 'ra2_in1k',
            81.472, 95.696, 12.50, 12.23, 1.65, 0.96),
)

VARIANTS: Dict[str, Variant] = {v.name: v for v in _TABLE}


def get_variant(name: str) -> Variant:
    """The variant called ``name`` (a ``.tag`` suffix is ignored); UnknownModelError lists the valid names."""
    key = name.split('.', 1)[0]
    try:
        return VARIANTS[key]
    except KeyError:
        raise UnknownModelError(f'unknown model {name!r}; use one of {", ".join(VARIANTS)}, or hf-hub:<repo_id>, or '
                                f'local-dir:<folder>') from None

"""The one table of EMA variants: the single source of truth for models, pretrained tags, listings and cards.

Every variant is its timm base architecture with EMA added at its family's placement (``placement.FAMILIES``). Model
registration (``ema_hub.models``), the pretrained cfgs and warm-start mapping (``ema_hub.pretrained``),
the model cards (``ema_hub.cards``) and the CLI's listing are all generated from ``VARIANTS``.
"""
from dataclasses import dataclass, field
from typing import Dict, Mapping, Tuple

from .errors import UnknownModelError
from .placement import FAMILIES, Family

__all__ = ['Family', 'FAMILIES', 'Variant', 'VARIANTS', 'EMA_FACTOR', 'BASE_RESULTS', 'default_tag', 'get_variant']

# The paper's group count, used by every variant.
EMA_FACTOR = 32

# timm's published ImageNet-1k results of the bases' pretrained tags, each at the tag's default input size:
# {'<base>.<tag>': (input size, top-1, top-5)}, from timm's results/results-imagenet.csv. Tags it has no row for
# at that size (feature-only or ImageNet-21k heads) are absent. The variants' figures and the default tag's rule
# (``default_tag``) read this table.
BASE_RESULTS: Dict[str, Tuple[int, float, float]] = {
    'resnet18.a1_in1k': (224, 71.504, 90.086),
    'resnet18.a2_in1k': (224, 70.634, 89.486),
    'resnet18.a3_in1k': (160, 65.670, 86.268),
    'resnet18.fb_ssl_yfcc100m_ft_in1k': (224, 72.636, 91.416),
    'resnet18.fb_swsl_ig1b_ft_in1k': (224, 73.286, 91.754),
    'resnet18.gluon_in1k': (224, 70.844, 89.750),
    'resnet18.tv_in1k': (224, 69.752, 89.082),
    'resnet34.a1_in1k': (224, 76.420, 92.896),
    'resnet34.a2_in1k': (224, 75.520, 92.454),
    'resnet34.a3_in1k': (160, 70.580, 89.540),
    'resnet34.bt_in1k': (224, 75.176, 92.166),
    'resnet34.gluon_in1k': (224, 74.574, 91.988),
    'resnet34.ra4_e3600_r224_in1k': (224, 77.492, 93.498),
    'resnet34.tv_in1k': (224, 73.298, 91.422),
    'resnet50.a1_in1k': (224, 80.382, 94.598),
    'resnet50.a1h_in1k': (176, 79.264, 94.498),
    'resnet50.a2_in1k': (224, 79.828, 94.560),
    'resnet50.a3_in1k': (160, 75.994, 92.494),
    'resnet50.am_in1k': (224, 79.004, 94.392),
    'resnet50.b1k_in1k': (224, 79.564, 94.622),
    'resnet50.b2k_in1k': (224, 79.388, 94.580),
    'resnet50.bt_in1k': (224, 78.444, 94.274),
    'resnet50.c1_in1k': (224, 79.766, 94.954),
    'resnet50.c2_in1k': (224, 79.868, 94.862),
    'resnet50.d_in1k': (224, 79.904, 94.666),
    'resnet50.fb_ssl_yfcc100m_ft_in1k': (224, 79.252, 94.826),
    'resnet50.fb_swsl_ig1b_ft_in1k': (224, 81.146, 95.980),
    'resnet50.gluon_in1k': (224, 77.580, 93.704),
    'resnet50.ra_in1k': (224, 78.820, 94.314),
    'resnet50.ram_in1k': (224, 79.034, 94.386),
    'resnet50.tv2_in1k': (176, 79.434, 94.640),
    'resnet50.tv_in1k': (224, 76.156, 92.866),
    'resnet101.a1_in1k': (224, 81.494, 95.164),
    'resnet101.a1h_in1k': (224, 81.950, 95.760),
    'resnet101.a2_in1k': (224, 81.344, 95.198),
    'resnet101.a3_in1k': (160, 77.928, 93.686),
    'resnet101.gluon_in1k': (224, 79.306, 94.538),
    'resnet101.tv2_in1k': (176, 79.908, 94.606),
    'resnet101.tv_in1k': (224, 77.404, 93.552),
    'resnet152.a1_in1k': (224, 81.998, 95.294),
    'resnet152.a1h_in1k': (224, 82.818, 96.124),
    'resnet152.a2_in1k': (224, 81.764, 95.270),
    'resnet152.a3_in1k': (160, 78.896, 94.140),
    'resnet152.gluon_in1k': (224, 79.712, 94.720),
    'resnet152.tv2_in1k': (176, 80.222, 94.650),
    'resnet152.tv_in1k': (224, 78.330, 94.046),
    'resnext50_32x4d.a1_in1k': (224, 80.526, 94.458),
    'resnext50_32x4d.a1h_in1k': (224, 81.140, 95.320),
    'resnext50_32x4d.a2_in1k': (224, 80.444, 94.630),
    'resnext50_32x4d.a3_in1k': (160, 77.732, 93.314),
    'resnext50_32x4d.fb_ssl_yfcc100m_ft_in1k': (224, 80.316, 95.386),
    'resnext50_32x4d.fb_swsl_ig1b_ft_in1k': (224, 82.162, 96.224),
    'resnext50_32x4d.gluon_in1k': (224, 79.354, 94.424),
    'resnext50_32x4d.ra_in1k': (224, 79.800, 94.608),
    'resnext50_32x4d.tv2_in1k': (176, 79.384, 94.302),
    'resnext50_32x4d.tv_in1k': (224, 77.632, 93.674),
    'resnet50d.a1_in1k': (224, 80.730, 94.678),
    'resnet50d.a2_in1k': (224, 80.268, 94.642),
    'resnet50d.a3_in1k': (160, 77.222, 93.256),
    'resnet50d.gluon_in1k': (224, 79.080, 94.458),
    'resnet50d.ra2_in1k': (224, 80.546, 95.160),
    'resnet50d.ra4_e3600_r224_in1k': (224, 80.956, 95.380),
    'resnet101d.gluon_in1k': (224, 80.466, 95.034),
    'resnet101d.ra2_in1k': (256, 82.254, 96.070),
    'wide_resnet50_2.racm_in1k': (224, 81.466, 95.544),
    'wide_resnet50_2.tv2_in1k': (176, 80.442, 95.076),
    'wide_resnet50_2.tv_in1k': (224, 78.486, 94.084),
    'mobilenetv2_100.ra_in1k': (224, 72.910, 91.000),
    'mobilenetv2_140.ra_in1k': (224, 76.528, 93.008),
    'mobilenetv3_large_100.miil_in21k_ft_in1k': (224, 77.920, 92.894),
    'mobilenetv3_large_100.ra4_e3600_r224_in1k': (224, 76.310, 92.842),
    'mobilenetv3_large_100.ra_in1k': (224, 75.784, 92.528),
    'convnext_tiny.fb_in1k': (224, 82.066, 95.854),
    'convnext_tiny.fb_in22k_ft_in1k': (224, 82.900, 96.616),
    'convnext_tiny.fb_in22k_ft_in1k_384': (384, 84.098, 97.138),
    'convnext_tiny.in12k_ft_in1k': (224, 84.192, 97.132),
    'convnext_tiny.in12k_ft_in1k_384': (384, 85.154, 97.634),
    'convnext_small.fb_in1k': (224, 83.144, 96.432),
    'convnext_small.fb_in22k_ft_in1k': (224, 84.582, 97.414),
    'convnext_small.fb_in22k_ft_in1k_384': (384, 85.752, 97.878),
    'convnext_small.in12k_ft_in1k': (224, 85.164, 97.502),
    'convnext_small.in12k_ft_in1k_384': (384, 86.186, 97.920),
    'convnext_base.clip_laion2b_augreg_ft_in12k_in1k': (256, 86.378, 97.976),
    'convnext_base.clip_laion2b_augreg_ft_in12k_in1k_384': (384, 87.144, 98.228),
    'convnext_base.clip_laion2b_augreg_ft_in1k': (256, 86.184, 97.674),
    'convnext_base.clip_laiona_augreg_ft_in1k_384': (384, 86.490, 97.960),
    'convnext_base.fb_in1k': (224, 83.838, 96.746),
    'convnext_base.fb_in22k_ft_in1k': (224, 85.814, 97.856),
    'convnext_base.fb_in22k_ft_in1k_384': (384, 86.826, 98.244),
    'efficientnet_b0.ra4_e3600_r224_in1k': (224, 78.568, 94.340),
    'efficientnet_b0.ra_in1k': (224, 77.698, 93.538),
    'efficientnet_b1.ft_in1k': (224, 77.592, 93.636),
    'efficientnet_b1.ra4_e3600_r240_in1k': (240, 80.404, 95.152),
    'efficientnet_b2.ra_in1k': (256, 79.324, 94.582),
    'efficientnet_b3.ra2_in1k': (288, 81.472, 95.696),
}


@dataclass(frozen=True)
class Variant:
    """One EMA-augmented timm architecture and the facts its cards and warm-start tag need."""
    name: str
    base: str                   # timm architecture it augments
    family: str                 # key of FAMILIES; picks the builder
    arch: Mapping[str, object]  # builder arguments (the base's own, as in its timm entry point)
    base_tag: str               # the default warm start's base tag (``default_tag``'s rule; every tag is a warm tag)
    base_top1: float            # that tag's ImageNet-1k top-1 at its default resolution (BASE_RESULTS)
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
        """The Hub repo of the default tag's base checkpoint, as timm publishes it."""
        return f'timm/{self.base}.{self.base_tag}'

    @property
    def base_tags(self) -> Tuple[str, ...]:
        """Every pretrained tag timm has for the base, the default first: each is a warm tag ``warm_<tag>``."""
        from timm import list_pretrained
        tags = sorted(name.split('.', 1)[1] for name in list_pretrained(f'{self.base}.*'))
        return (self.base_tag,) + tuple(t for t in tags if t != self.base_tag)

    @property
    def placement(self) -> str:
        return FAMILIES[self.family].placement


def default_tag(base: str, tags) -> str:
    """The rule for a variant's default warm tag: of the base's tags trained on ImageNet-1k alone (no pre-training on
    other data: no ``_ft_``, in12k, in21k or in22k), the one with the best published top-1 at its default size."""
    def in1k_only(tag: str) -> bool:
        return tag.endswith('in1k') and '_ft_' not in tag and not any(d in tag for d in ('in12k', 'in21k', 'in22k'))
    return max((t for t in tags if in1k_only(t) and f'{base}.{t}' in BASE_RESULTS),
               key=lambda t: BASE_RESULTS[f'{base}.{t}'][1])


def _variant(name, base, family, arch, base_tag, params, base_params, gmacs, base_gmacs):
    _, top1, top5 = BASE_RESULTS[f'{base}.{base_tag}']
    return Variant(name=name, base=base, family=family, arch=arch, base_tag=base_tag, base_top1=top1,
                   base_top5=top5, params_m=params, base_params_m=base_params, gmacs=gmacs, base_gmacs=base_gmacs)


def _resnet(name, base, layers, block, base_tag, params, base_params, gmacs, base_gmacs, **extra):
    return _variant(name, base, 'resnet', dict(block=block, layers=layers, **extra), base_tag, params, base_params,
                    gmacs, base_gmacs)


def _convnext(name, base, base_tag, params, base_params, gmacs, base_gmacs):
    """A ConvNeXt variant: the base as timm builds it, EMA grafted at the family's placement."""
    return _variant(name, base, 'convnext', {}, base_tag, params, base_params, gmacs, base_gmacs)


def _effnet(name, base, base_tag, params, base_params, gmacs, base_gmacs):
    """A variant of timm's EfficientNet builder: the base as timm builds it, EMA grafted at the family's placement."""
    return _variant(name, base, 'efficientnet', {}, base_tag, params, base_params, gmacs, base_gmacs)


_TABLE: Tuple[Variant, ...] = (
    # name, base, (layers, block,) default base tag, params (M) ema/base, GMACs ema/base (the top-1: BASE_RESULTS)
    _resnet('resnet18_ema', 'resnet18', (2, 2, 2, 2), 'basic', 'a1_in1k', 11.70, 11.69, 1.84, 1.81),
    _resnet('resnet34_ema', 'resnet34', (3, 4, 6, 3), 'basic', 'ra4_e3600_r224_in1k', 21.81, 21.80, 3.73, 3.66),
    _resnet('resnet50_ema', 'resnet50', (3, 4, 6, 3), 'bottleneck', 'a1_in1k', 25.76, 25.56, 5.04, 4.09),
    _resnet('resnet101_ema', 'resnet101', (3, 4, 23, 3), 'bottleneck', 'a1h_in1k', 44.92, 44.55, 9.76, 7.80),
    _resnet('resnet152_ema', 'resnet152', (3, 8, 36, 3), 'bottleneck', 'a1h_in1k', 60.71, 60.19, 14.47, 11.51),
    _resnet('resnext50_32x4d_ema', 'resnext50_32x4d', (3, 4, 6, 3), 'bottleneck', 'a1h_in1k',
            25.23, 25.03, 5.18, 4.23, cardinality=32, base_width=4),
    _resnet('resnet50d_ema', 'resnet50d', (3, 4, 6, 3), 'bottleneck', 'ra4_e3600_r224_in1k',
            25.77, 25.58, 5.28, 4.33, stem_width=32, stem_type='deep', avg_down=True),
    _resnet('resnet101d_ema', 'resnet101d', (3, 4, 23, 3), 'bottleneck', 'ra2_in1k',
            44.94, 44.57, 10.00, 8.04, stem_width=32, stem_type='deep', avg_down=True),
    _resnet('wide_resnet50_2_ema', 'wide_resnet50_2', (3, 4, 6, 3), 'bottleneck', 'racm_in1k',
            69.08, 68.88, 12.35, 11.40, base_width=128),
    _effnet('mobilenetv2_100_ema', 'mobilenetv2_100', 'ra_in1k', 3.55, 3.50, 0.44, 0.30),
    _effnet('mobilenetv2_140_ema', 'mobilenetv2_140', 'ra_in1k', 6.22, 6.11, 0.94, 0.58),
    _effnet('mobilenetv3_large_100_ema', 'mobilenetv3_large_100', 'ra4_e3600_r224_in1k', 5.52, 5.48, 0.30, 0.22),
    _effnet('efficientnet_b0_ema', 'efficientnet_b0', 'ra4_e3600_r224_in1k', 5.36, 5.29, 0.58, 0.39),
    _effnet('efficientnet_b1_ema', 'efficientnet_b1', 'ra4_e3600_r240_in1k', 7.93, 7.79, 0.88, 0.57),
    _effnet('efficientnet_b2_ema', 'efficientnet_b2', 'ra_in1k', 9.28, 9.11, 1.06, 0.66),
    _effnet('efficientnet_b3_ema', 'efficientnet_b3', 'ra2_in1k', 12.50, 12.23, 1.65, 0.96),
    _convnext('convnext_tiny_ema', 'convnext_tiny', 'fb_in1k', 28.62, 28.59, 4.61, 4.46),
    _convnext('convnext_small_ema', 'convnext_small', 'fb_in1k', 50.28, 50.22, 8.99, 8.68),
    _convnext('convnext_base_ema', 'convnext_base', 'fb_in1k', 88.70, 88.59, 15.89, 15.35),
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

"""What the CLI lists and describes: ``list_variants`` (``ema-hub list``) and ``describe`` (``ema-hub info``)."""
import contextlib
from pathlib import Path
from typing import Dict, List

import timm
from huggingface_hub import hf_hub_download

from .cards import card_summary, render_card
from .loading import create_model
from .lookup import is_cached
from .registry import BASE_RESULTS, VARIANTS
from .specs import parse_spec

__all__ = ['list_variants', 'describe']


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

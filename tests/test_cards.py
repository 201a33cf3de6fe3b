"""Model cards: one per variant, equal to what the registry renders, with valid Hub metadata."""
import dataclasses
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from timm.models import get_pretrained_cfg

from ema_hub import VARIANTS, ema_groups
from ema_hub.cards import CARD_TAGS, GENERATED_MARK, check_cards, main, render_card, write_cards
from ema_hub.errors import UnknownModelError
from ema_hub.registry import EMA_FACTOR

CARDS = Path(__file__).resolve().parents[1] / 'model_cards'
NAMES = list(VARIANTS)
REGENERATE = 'run `python -m ema_hub.cards` to regenerate the cards'
METRICS = dict(top1=91.234, top5=98.765, dataset='beans', num_classes=3, split='test')


@pytest.mark.parametrize('name', NAMES)
def test_card_file_matches_registry(name):
    path = CARDS / f'{name}.md'
    assert path.is_file(), f'{path} is missing: {REGENERATE}'
    assert path.read_text(encoding='utf-8') == render_card(name), f'{path} drifted from the registry: {REGENERATE}'


def test_no_cards_for_unknown_variants():
    assert sorted(p.name for p in CARDS.iterdir()) == sorted(f'{n}.md' for n in NAMES), REGENERATE


@pytest.mark.parametrize('name', NAMES)
def test_card_metadata(name):
    v = VARIANTS[name]
    data = ModelCard.load(CARDS / f'{name}.md').data
    assert data.library_name == 'timm'
    assert data.pipeline_tag == 'image-classification'
    assert data.base_model == f'timm/{v.base}.{v.base_tag}' == v.base_hub_id
    assert data.license == (get_pretrained_cfg(f'{v.base}.{v.base_tag}').license or 'apache-2.0')
    assert data.tags == list(CARD_TAGS)
    assert data.datasets == ['imagenet-1k']
    assert data.eval_results is None  # the warm tag's accuracy is the base's: prose, not a model-index claim


@pytest.mark.parametrize('name', NAMES)
def test_card_states_registry_numbers(name):
    v = VARIANTS[name]
    text = render_card(name)
    assert f'# {v.name}.{v.warm_tag}\n' in text
    assert f'| Params (M) | {v.params_m:.2f} | {v.base_params_m:.2f} | {v.params_m - v.base_params_m:+.2f} ' in text
    assert f'| GMACs at 224x224 | {v.gmacs:.2f} | {v.base_gmacs:.2f} | {v.gmacs - v.base_gmacs:+.2f} ' in text
    assert f'top-1 **{v.base_top1:.3f} %**, top-5 **{v.base_top5:.3f} %**' in text
    assert "timm's published results for the base model" in text
    assert v.placement in text
    assert f'largest divisor of C not above the factor {EMA_FACTOR}' in text
    assert f'https://huggingface.co/{v.base_hub_id}' in text
    # Usage: classification, CLI, features, fine-tuning, all with the warm tag.
    ref = f'{v.name}.{v.warm_tag}'
    for snippet in (f"timm.create_model('{ref}', pretrained=True).eval()", 'import ema_hub',
                    f'ema-classify image.jpg --model {ref}', 'features_only=True',
                    'forward_head(features, pre_logits=True)',
                    f"timm.create_model('{ref}', pretrained=True, num_classes=10)",
                    f'ema-hub finetune {ref} DATA --output DIR'):
        assert snippet in text
    # Citation: the paper with its full author list.
    assert 'arXiv 2305.13563' in text and 'eprint        = {2305.13563}' in text
    assert ('Ouyang, Daliang and He, Su and Zhang, Guozhong and Luo, Mingzhu and Guo, Huaiyong and Zhan, Jian '
            'and Huang, Zhijie') in text


@pytest.mark.parametrize('name', NAMES)
def test_card_group_widths_follow_the_rule(name):
    line = next(l for l in render_card(name).splitlines() if l.startswith('- **This model**'))
    widths = [tuple(map(int, m)) for m in re.findall(r'(\d+) → (\d+) x (\d+) \((\d+)\)', line)]
    assert widths
    for c, g, per_group, _ in widths:
        assert g == ema_groups(c, EMA_FACTOR) and g * per_group == c
    if VARIANTS[name].family == 'efficientnet':  # the paper's rule: inverted residuals wider than 144 only
        assert all(c > 144 for c, _, _, _ in widths)


def test_card_follows_the_registry(monkeypatch):
    v = VARIANTS['resnet18_ema']
    monkeypatch.setitem(VARIANTS, v.name, dataclasses.replace(v, params_m=12.34, base_top1=70.125))
    text = render_card(v.name)
    assert '| Params (M) | 12.34 |' in text and 'top-1 **70.125 %**' in text
    assert check_cards(CARDS) == [f'{CARDS / "resnet18_ema.md"}: differs from render_card(\'resnet18_ema\')']


def test_trained_card_with_repo():
    text = render_card('resnet50_ema', repo_id='someone/resnet50_ema.beans', weights='trained', metrics=METRICS)
    card = ModelCard(text)
    assert card.data.library_name == 'timm' and card.data.pipeline_tag == 'image-classification'
    assert card.data.base_model == 'timm/resnet50.a1_in1k' and card.data.license
    assert card.data.datasets == ['imagenet-1k', 'beans']
    results = {r.metric_name: r for r in card.data.eval_results}
    assert results['Top-1 accuracy'].metric_value == 91.234 and results['Top-5 accuracy'].metric_value == 98.765
    assert results['Top-1 accuracy'].dataset_type == 'beans' and results['Top-1 accuracy'].dataset_split == 'test'
    assert 'top-1 **91.23 %**, top-5 **98.77 %** on `beans`, test split, measured on this checkpoint' in text
    assert '- **Classes:** 3.' in text
    assert "timm.create_model('hf-hub:someone/resnet50_ema.beans', pretrained=True).eval()" in text
    assert 'ema-classify image.jpg --model hf-hub:someone/resnet50_ema.beans' in text
    assert "create_model('resnet50_ema.warm" not in text
    # The base's numbers appear only as the base's reference, next to the measured ones.
    assert '`timm/resnet50.a1_in1k` has ImageNet-1k top-1 **80.382 %**' in text


def test_trained_card_without_repo_loads_a_local_checkpoint():
    metrics = dict(top1=88.5, dataset='/data/my images', num_classes=7)
    card = ModelCard(render_card('mobilenetv2_100_ema', weights='trained', metrics=metrics))
    assert card.data.datasets == ['imagenet-1k']  # a local path is no Hub dataset id
    assert card.data.eval_results is None
    assert ("timm.create_model('mobilenetv2_100_ema', pretrained=True, pretrained_cfg_overlay=dict("
            "file='model.safetensors', num_classes=7), num_classes=7).eval()") in card.text
    assert 'top-1 **88.50 %** on `/data/my images`' in card.text


def test_trained_card_states_its_initialisation():
    warm = render_card('resnet18_ema', weights='trained', metrics=METRICS)
    assert render_card('resnet18_ema', weights='trained', metrics=dict(METRICS, init='resnet18_ema')) == warm
    assert render_card('resnet18_ema', weights='trained',
                       metrics=dict(METRICS, init='resnet18_ema.warm_a1_in1k')) == warm
    assert 'starting from the warm start `resnet18_ema.warm_a1_in1k`' in warm

    text = render_card('resnet18_ema', weights='trained', metrics=dict(METRICS, init='random'))
    card = ModelCard(text)
    assert 'imagenet-1k' not in (card.data.datasets or [])
    assert card.data.datasets == ['beans'] and card.data.base_model is None
    assert 'starting from random initialisation' in text and '- **Initialisation:** random' in text
    assert 'warm start' not in text.split('## EMA')[0]  # the intro
    assert '`resnet18_ema.warm_a1_in1k` from timm' not in text

    text = render_card('resnet18_ema', weights='trained', metrics=dict(METRICS, init='hf-hub:org/x'))
    card = ModelCard(text)
    assert card.data.datasets == ['beans'] and card.data.base_model == 'org/x'
    assert 'starting from the checkpoint `hf-hub:org/x`' in text and 'warm_a1_in1k` from timm' not in text


def test_render_card_rejects_bad_arguments():
    with pytest.raises(UnknownModelError, match='use one of'):
        render_card('resnet51_ema')
    with pytest.raises(ValueError, match='weights'):
        render_card('resnet18_ema', weights='best')
    with pytest.raises(ValueError, match='top1'):
        render_card('resnet18_ema', weights='trained')
    with pytest.raises(ValueError, match='num_classes'):
        render_card('resnet18_ema', weights='trained', metrics=dict(top1=1.0, dataset='beans'))
    with pytest.raises(ValueError, match='trained'):
        render_card('resnet18_ema', metrics=METRICS)
    with pytest.raises(ValueError, match='init'):
        render_card('resnet18_ema', weights='trained', metrics=dict(METRICS, init=''))


def test_write_and_check(tmp_path, capsys):
    out = tmp_path / 'cards'
    assert main(['--check', '--out-dir', str(out)]) == 1
    assert 'missing' in capsys.readouterr().err
    paths = write_cards(out)
    assert sorted(p.name for p in paths) == sorted(f'{n}.md' for n in NAMES)
    assert check_cards(out) == []
    assert main(['--check', '--out-dir', str(out)]) == 0

    (out / 'resnet18_ema.md').write_text(render_card('resnet18_ema').replace('11.70', '11.71'), encoding='utf-8')
    (out / 'gone_ema.md').write_text(f'{GENERATED_MARK}\n', encoding='utf-8')
    (out / 'notes.md').write_text('hand-written\n', encoding='utf-8')
    problems = check_cards(out)
    expected = [str(out / f) for f in ('resnet18_ema.md', 'gone_ema.md', 'notes.md')]
    assert [p.split(': ', 1)[0] for p in problems] == expected
    assert main(['--check', '--out-dir', str(out)]) == 1
    assert 'python -m ema_hub.cards' in capsys.readouterr().err

    # Writing repairs drift and removes stale generated cards; it never deletes a file it did not write.
    assert main(['--out-dir', str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([f'{n}.md' for n in NAMES] + ['notes.md'])
    assert check_cards(out) == [f'{out / "notes.md"}: no such variant']

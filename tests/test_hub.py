"""Models and weights on the Hub (ema_hub/hub.py and what it re-exports: loading, lookup, checkpoints, catalog):
create, describe, list, download, publish and convert, through the real huggingface_hub client and timm's loader,
against a loopback Hub; every fault a specific exception with a one-line message naming the problem and the fix."""
import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard

from ema_hub import VARIANTS
from ema_hub import hub
from ema_hub.errors import CheckpointKeysError, CorruptWeightsError, ShapeMismatchError, UnknownModelError, \
    UsageError, WeightsUnavailableError
from support.models import random_base, rel_err as _rel_err, serve_base, train_py_checkpoint, \
    trained_ema as _trained_ema


def test_publish_dry_run_loads_with_local_dir(tmp_path):
    model = _trained_ema()
    folder = hub.publish(model, 'someone/resnet18-ema-test', dry_run_dir=tmp_path / 'out',
                         metrics={'top1': 91.5, 'top5': 99.0, 'dataset': 'digits'})
    names = sorted(os.listdir(folder))
    assert names == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['architecture'] == 'resnet18_ema' and config['num_classes'] == 5
    assert ModelCard.load(tmp_path / 'out' / 'README.md').data.library_name == 'timm'
    loaded = timm.create_model(f'local-dir:{folder}').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert hub.class_labels(loaded) == [f'class_{i}' for i in range(5)]


def test_save_pretrained_label_names_and_data_config(tmp_path):
    model = timm.create_model('resnet18_ema', num_classes=3)
    hub.save_pretrained(model, tmp_path, label_names=['cat', 'dog', 'eel'],
                        data_config={'input_size': (3, 32, 32), 'interpolation': 'bilinear', 'crop_pct': 1.0,
                                     'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25)})
    loaded = timm.create_model(f'local-dir:{tmp_path}')
    assert hub.class_labels(loaded) == ['cat', 'dog', 'eel']
    cfg = timm.data.resolve_data_config({}, model=loaded)
    assert cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0 and tuple(cfg['mean']) == (0.5, 0.5, 0.5)


def test_publish_uploads_and_loads_with_hf_hub(fake_hub):
    model = _trained_ema()
    hub.publish(model, 'someone/resnet18-ema', token='test')
    assert set(fake_hub.files('someone/resnet18-ema')) >= {'config.json', 'model.safetensors', 'README.md'}
    loaded = hub.create_model('hf-hub:someone/resnet18-ema').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_download_to_cache_then_offline_in_fresh_process(fake_hub, hub_env):
    serve_base(fake_hub, 'resnet18_ema')
    path = hub.download('resnet18_ema')
    assert path.is_file() and hub.is_cached('resnet18_ema')
    before = fake_hub.request_count
    code = ('import timm, ema_hub, torch; m = timm.create_model("resnet18_ema", pretrained=True).eval(); '
            'print(m(torch.zeros(1, 3, 32, 32)).shape)')
    out = subprocess.run([sys.executable, '-c', code], env={**hub_env, 'HF_HUB_OFFLINE': '1'},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '1000' in out.stdout
    assert fake_hub.request_count == before


def test_download_to_folder_is_loadable_warm_model(fake_hub, tmp_path):
    base = serve_base(fake_hub, 'resnet18_ema')
    folder = hub.download('resnet18_ema', to=tmp_path / 'r18')
    model = timm.create_model(f'local-dir:{folder}').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _rel_err(model(x), base(x)) <= 1e-5


def test_publish_local_dir_keeps_its_card(fake_hub, tmp_path):
    folder = hub.publish(_trained_ema(), 'someone/x', dry_run_dir=tmp_path / 'run',
                         metrics={'top1': 88.25, 'dataset': 'digits'})
    hub.publish(f'local-dir:{folder}', 'someone/finetuned', token='test')
    card = fake_hub.files('someone/finetuned')['README.md'].decode()
    assert '88.25' in card and card == (tmp_path / 'run' / 'README.md').read_text()


def test_download_published_checkpoint_to_folder(fake_hub, tmp_path):
    hub.publish(_trained_ema(), 'someone/r18', token='test')
    folder = hub.download('hf-hub:someone/r18', to=tmp_path / 'copy')
    assert {'config.json', 'model.safetensors', 'README.md'} <= set(os.listdir(folder))


# --- faults: each a specific exception with a one-line message naming the problem and the fix ---

def _one_line(error) -> str:
    text = str(error.value)
    assert '\n' not in text
    return text


def test_unknown_repo(fake_hub):
    with pytest.raises(WeightsUnavailableError) as e:
        hub.create_model('hf-hub:nobody/nothing')
    assert 'nobody/nothing' in _one_line(e) and 'HF_ENDPOINT' in _one_line(e)


def test_missing_file(fake_hub):
    fake_hub.add_file('timm/resnet18.a1_in1k', 'README.md', b'no weights here')
    with pytest.raises(WeightsUnavailableError) as e:
        hub.create_model('resnet18_ema')
    assert 'model.safetensors' in _one_line(e) and 'missing' in _one_line(e)


def test_no_network(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hc, 'HF_HUB_CACHE', str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as e:
        hub.create_model('resnet18_ema')
    message = _one_line(e)
    assert 'HF_ENDPOINT' in message and 'HF_HUB_OFFLINE' in message and 'ema-hub download' in message


def test_unknown_model_and_tag():
    with pytest.raises(UnknownModelError) as e:
        hub.create_model('resnet50_ema.nope')
    assert 'warm_a1_in1k' in _one_line(e)
    with pytest.raises(UnknownModelError) as e:
        hub.create_model('resnet51_ema')
    assert 'resnet50_ema' in _one_line(e)


def test_corrupted_and_truncated_weights(fake_hub, tmp_path):
    good = safetensors.torch.save(random_base('resnet18').state_dict())
    fake_hub.add_file('timm/resnet18.a1_in1k', 'model.safetensors', good[: len(good) // 2])
    with pytest.raises(CorruptWeightsError) as e:
        hub.create_model('resnet18_ema')
    assert 'corrupted' in _one_line(e) and '--force' in _one_line(e)
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'\x00' * 64)
    with pytest.raises(CorruptWeightsError):
        hub.create_model('resnet18_ema', weights=bad)
    folder = hub.save_pretrained(timm.create_model('resnet18_ema', num_classes=3), tmp_path / 'run')
    (folder / 'model.safetensors').write_bytes(b'\x00' * 64)
    with pytest.raises(CorruptWeightsError) as e:  # a local folder is replaced, not downloaded again
        hub.create_model(f'local-dir:{folder}')
    assert 'model.safetensors with a good copy' in _one_line(e) and '--force' not in _one_line(e)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / 'w.safetensors'
    safetensors.torch.save_file(_trained_ema(num_classes=5).state_dict(), str(path))
    with pytest.raises(ShapeMismatchError) as e:
        hub.create_model('resnet18_ema', weights=path, num_classes=7)
    assert e.value.key == 'fc.weight' and e.value.checkpoint_shape == (5, 512) and e.value.model_shape == (7, 512)
    assert '(5, 512)' in _one_line(e) and '(7, 512)' in _one_line(e)
    loaded = hub.create_model('resnet18_ema', weights=path, num_classes=5)
    assert loaded.fc.out_features == 5
    assert hub.create_model('resnet18_ema', weights=path).fc.out_features == 5  # head size from the file


# --- conversion of the paper's checkpoints ---

def _paper_state(name='resnet18_ema', attn='ema', wrap=True):
    """A checkpoint as the paper's code saves it: attention under its own name, DDP prefix, wrapped."""
    state = {}
    for key, value in _trained_ema(name, num_classes=1000).state_dict().items():
        state['module.' + key.replace('.se.', f'.{attn}.')] = value
    return {'epoch': 90, 'state_dict': state} if wrap else state


def test_convert_paper_checkpoint(tmp_path):
    src = tmp_path / 'paper.pth'
    torch.save(_paper_state(), src)
    out = tmp_path / 'converted.safetensors'
    report = hub.convert_checkpoint(src, 'resnet18_ema', out)
    assert report['renamed'] == 8 * 6 and report['num_classes'] == 1000
    model = hub.create_model('resnet18_ema', weights=out).eval()
    expected = _trained_ema('resnet18_ema', num_classes=1000)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x))


def test_convert_reports_unknown_and_missing_keys(tmp_path):
    state = _paper_state(wrap=False)
    state['module.extra.weight'] = torch.zeros(3)
    del state['module.layer1.0.ema.gn.weight']
    src = tmp_path / 'paper.pth'
    torch.save(state, src)
    with pytest.raises(CheckpointKeysError) as e:
        hub.convert_checkpoint(src, 'resnet18_ema', tmp_path / 'o.safetensors')
    assert e.value.unknown == ['extra.weight'] and e.value.missing == ['layer1.0.se.gn.weight']
    assert 'extra.weight' in _one_line(e) and 'layer1.0.se.gn.weight' in _one_line(e)


def test_convert_reports_shape_mismatch(tmp_path):
    src = tmp_path / 'paper.pth'
    torch.save(_paper_state('resnext50_32x4d_ema'), src)  # same keys as resnet50, wider grouped convs
    with pytest.raises(ShapeMismatchError) as e:
        hub.convert_checkpoint(src, 'resnet50_ema', tmp_path / 'o.safetensors')
    assert e.value.key == 'layer1.0.conv1.weight'
    assert e.value.checkpoint_shape == (128, 64, 1, 1) and e.value.model_shape == (64, 64, 1, 1)


def test_convert_reports_missing_blocks(tmp_path):
    src = tmp_path / 'paper.pth'
    torch.save(_paper_state('resnet18_ema'), src)
    with pytest.raises(CheckpointKeysError) as e:
        hub.convert_checkpoint(src, 'resnet34_ema', tmp_path / 'o.safetensors')
    assert 'layer1.2.conv1.weight' in e.value.missing and not e.value.unknown


class _Payload:
    """Unpickling this would run code: weights_only loading must refuse it."""
    def __reduce__(self):
        return (os.system, ('echo pwned > /dev/null',))


def test_convert_refuses_pickled_code(tmp_path):
    src = tmp_path / 'evil.pth'
    torch.save({'state_dict': _Payload()}, src)
    with pytest.raises(CorruptWeightsError) as e:
        hub.convert_checkpoint(src, 'resnet18_ema', tmp_path / 'o.safetensors')
    assert 'weights-only' in _one_line(e)


# --- timm's training checkpoints (train.py's model_best.pth.tar), as --weights and convert read them ---

@pytest.mark.parametrize('ddp', [False, True])
def test_read_checkpoint_takes_what_timm_loads(tmp_path, caplog, ddp):
    """A CheckpointSaver file (args pickled as a Namespace): the entry timm's own load_state_dict takes, prefixes
    gone (state_dict, or with use_ema the averaged state_dict_ema), the entry named in the log; the model loads it."""
    model, averaged, path = train_py_checkpoint(tmp_path, ddp=ddp)
    x = torch.randn(1, 3, 64, 64)
    for use_ema, reference, entry in ((False, model, 'state_dict'), (True, averaged, 'state_dict_ema')):
        caplog.clear()
        with caplog.at_level('INFO', logger='ema_hub'):
            state = hub.read_checkpoint(path, use_ema)
        assert caplog.messages == [f'weights: model_best.pth.tar, entry {entry}']
        by_timm = timm.models.load_state_dict(str(path), use_ema=use_ema, weights_only=True)
        assert list(state) == list(by_timm) == list(reference.state_dict())
        assert all(torch.equal(state[k], v) and torch.equal(by_timm[k], v) for k, v in reference.state_dict().items())
        with torch.no_grad():
            torch.testing.assert_close(hub.create_model('resnet18_ema', weights=path, use_ema=use_ema).eval()(x),
                                       reference(x))
    with torch.no_grad():
        assert (model(x) - averaged(x)).abs().max() > 1e-2  # the two entries are different weights


def test_convert_train_py_checkpoint(tmp_path):
    model, averaged, path = train_py_checkpoint(tmp_path / 'run')
    x = torch.randn(1, 3, 64, 64)
    for use_ema, reference in ((False, model), (True, averaged)):
        out = tmp_path / f'converted_{use_ema}.safetensors'
        report = hub.convert_checkpoint(path, 'resnet18_ema', out, use_ema)
        assert report['num_classes'] == 5 and report['renamed'] == 0
        with torch.no_grad():
            torch.testing.assert_close(hub.create_model('resnet18_ema', weights=out).eval()(x), reference(x))


class _Custom:
    """A class of the test's own: harmless, but weights-only loading must refuse any class it does not know."""


def test_checkpoint_faults_are_one_line_errors(tmp_path):
    model, _, path = train_py_checkpoint(tmp_path / 'run')
    custom = tmp_path / 'custom.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'args': _Custom()}, custom)
    with pytest.raises(CorruptWeightsError) as e:
        hub.read_checkpoint(custom)
    assert f'{__name__}._Custom' in _one_line(e) and 'weights-only' in _one_line(e)
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(CorruptWeightsError) as e:
        hub.create_model('resnet18_ema', weights=truncated)
    assert 'truncated or corrupted' in _one_line(e)
    plain = tmp_path / 'plain.pth'
    torch.save(model.state_dict(), plain)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / 'plain.safetensors'))
    (tmp_path / 'weights.bin').write_bytes((tmp_path / 'plain.safetensors').read_bytes())  # safetensors, named so
    for single in (plain, tmp_path / 'plain.safetensors', tmp_path / 'weights.bin'):
        assert hub.read_checkpoint(single).keys() == model.state_dict().keys()
        with pytest.raises(UsageError) as e:  # one set of weights: no averaged copy to take
            hub.read_checkpoint(single, use_ema=True)
        assert 'state_dict_ema' in _one_line(e) and '--use-ema' in _one_line(e)
    with pytest.raises(UsageError) as e:
        hub.create_model('resnet18_ema', use_ema=True)
    assert '--weights' in _one_line(e)


# --- what `ema-hub list` and `ema-hub info` show, in-process ---

def test_list_variants_rows_and_cache_state(fake_hub):
    rows = hub.list_variants()
    assert [r['model'] for r in rows] == [f'{v.name}.{v.warm_tag}' for v in VARIANTS.values()]
    for row, v in zip(rows, VARIANTS.values()):
        assert row == {'model': f'{v.name}.{v.warm_tag}', 'default': True, 'base': v.base, 'params_m': v.params_m,
                       'gmacs': v.gmacs, 'base_top1': v.base_top1, 'cached': False}
    serve_base(fake_hub, 'resnet18_ema')
    hub.download('resnet18_ema')
    cached = {r['model']: r['cached'] for r in hub.list_variants()}
    assert cached.pop('resnet18_ema.warm_a1_in1k') is True and not any(cached.values())
    # --all: a row per pretrained tag of each base, the default first; top-1 where timm publishes one
    rows = hub.list_variants(all_tags=True)
    assert len(rows) == sum(len(timm.list_pretrained(f'{v.base}.*')) for v in VARIANTS.values())
    by_model = {r['model']: r for r in rows}
    assert by_model['resnet50_ema.warm_tv2_in1k']['base_top1'] == 79.434 and not by_model['resnet50_ema.warm_tv2_in1k']['default']
    assert by_model['mobilenetv3_large_100_ema.warm_miil_in21k']['base_top1'] is None


def test_describe_variant_without_network():
    info = hub.describe('resnet18_ema')  # builds the model with pretrained=False: nothing is downloaded
    assert (info['model'], info['architecture'], info['num_classes'], info['num_features']) == (
        'resnet18_ema', 'resnet18_ema', 1000, 512)
    assert info['params_m'] == VARIANTS['resnet18_ema'].params_m and info['cached'] is False
    cfg = info['pretrained_cfg']
    assert cfg['hf_hub_id'] == 'timm/resnet18.a1_in1k' and cfg['tag'] == 'warm_a1_in1k'
    assert cfg['label_names'].startswith('1000 names (n01440764, ') and 'label_descriptions' not in cfg
    assert all(v is not None for v in cfg.values())
    assert info['data_config']['input_size'] == (3, 224, 224) and info['data_config']['crop_pct'] == 0.95
    assert 'warm start' in info['card_summary'] and '\n' not in info['card_summary']
    json.dumps(info)  # what `ema-hub info --json` prints


def test_describe_checkpoint_folder_and_unknown_model(checkpoint):
    info = hub.describe(f'local-dir:{checkpoint}')
    assert info['num_classes'] == 5 and info['architecture'] == 'resnet18_ema' and info['cached'] is None
    assert info['pretrained_cfg']['label_names'] == '5 names (ant, bee, cat, ...)'
    assert info['card_summary'] and info['data_config']['input_size'] == (3, 224, 224)
    with pytest.raises(UnknownModelError, match='use one of'):
        hub.describe('resnet18_nope')


@pytest.mark.parametrize('name,layers', [('mobilenetv2_100_ema', 13), ('efficientnet_b0_ema', 12)])
def test_convert_paper_fork_training_checkpoint(tmp_path, name, layers):
    """A timm training checkpoint of the paper's timm fork: EMA as ``blocks.i.j.ema.*`` in exactly the blocks its
    rule picks (after SE, where the block has one, at ``blocks.i.j.se.*``)."""
    trained = _trained_ema(name, num_classes=1000)
    fork = {}
    for key, value in trained.state_dict().items():
        for ours, theirs in (('.se.1.', '.ema.'), ('.se.0.', '.se.'), ('.se.gn.', '.ema.gn.'),
                             ('.se.conv1x1.', '.ema.conv1x1.'), ('.se.conv3x3.', '.ema.conv3x3.')):
            if ours in key:  # EMA behind SE, the SE itself, EMA in the attention slot
                key = key.replace(ours, theirs)
                break
        fork[key] = value
    assert sum('.ema.' in k for k in fork) == layers * 6
    src = tmp_path / 'model_best.pth.tar'
    torch.save({'epoch': 299, 'arch': name.removesuffix('_ema'), 'state_dict': fork,
                'optimizer': {'state': {}, 'param_groups': [{'lr': 0.01, 'params': [0, 1]}]}, 'version': 2}, src)
    report = hub.convert_checkpoint(src, name, tmp_path / 'converted.safetensors')
    assert report['renamed'] == layers * 6
    model = hub.create_model(name, weights=tmp_path / 'converted.safetensors').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))

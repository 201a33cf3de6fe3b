"""Warm starts and the checkpoint checks of ema_hub/pretrained.py, through the real huggingface_hub client and
timm's pretrained loader, against a loopback Hub."""
import pytest
import safetensors.torch
import timm
import torch

from ema_hub import EMA, VARIANTS
from ema_hub import hub
from ema_hub.errors import CheckpointKeysError, ShapeMismatchError
from ema_hub.pretrained import as_variant_state, check_state_dict, checkpoint_filter_fn, loads_weights
from support.models import LABELS, acting, random_base, rel_err as _rel_err, serve_base


def test_every_base_tag_is_a_warm_tag():
    """Each carries its base tag's data config, head size and labels, and fetches that base checkpoint."""
    for v in VARIANTS.values():
        for tag in v.base_tags:
            cfg = timm.models.get_pretrained_cfg(f'{v.name}.warm_{tag}').to_dict()
            base = timm.models.get_pretrained_cfg(f'{v.base}.{tag}').to_dict()
            assert cfg['hf_hub_id'] == f'timm/{v.base}.{tag}' and cfg['hf_hub_filename'] == 'model.safetensors'
            for key in ('num_classes', 'input_size', 'crop_pct', 'mean', 'std', 'interpolation', 'license'):
                assert cfg.get(key) == base.get(key), (v.name, tag, key)
            assert len(cfg.get('label_names') or ()) == (base['num_classes'] if base['num_classes'] in (
                1000, 11221, 11821, 21841, 21843) else 0), (v.name, tag)


@pytest.mark.parametrize('name,tag,classes', [('resnet50_ema', 'tv2_in1k', 1000),
                                              ('mobilenetv3_large_100_ema', 'miil_in21k', 11221),
                                              ('resnet50_ema', 'bamboo', 0)])
def test_other_warm_tags_equal_their_base(fake_hub, name, tag, classes):
    """Any tag of the base, the head sized as the base's (none for a feature-only base)."""
    base = serve_base(fake_hub, name, tag)
    model = timm.create_model(f'{name}.warm_{tag}', pretrained=True).eval()
    assert model.num_classes == classes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel_err(model(x), base(x)) <= 1e-5
    if classes:
        assert len(hub.class_labels(model)) == classes


@pytest.mark.parametrize('name', list(VARIANTS))
def test_warm_start_equals_base(fake_hub, name):
    base = serve_base(fake_hub, name)
    model = timm.create_model(name, pretrained=True).eval()
    x = torch.randn(2, 3, 64, 56)
    with torch.no_grad():
        assert _rel_err(model(x), base(x)) <= 1e-5
    # Every EMA layer starts as x/2: gn and conv3x3 zero; conv1x1 keeps a random (non-zero) init.
    for m in model.modules():
        if isinstance(m, EMA):
            assert not m.gn.weight.any() and not m.gn.bias.any() and not m.conv3x3.weight.any()
            assert m.conv1x1.weight.abs().sum() > 0
    base_cfg = timm.models.get_pretrained_cfg(f'{VARIANTS[name].base}.{VARIANTS[name].base_tag}').to_dict()
    assert timm.data.resolve_data_config({}, model=model) == timm.data.resolve_data_config(
        {}, pretrained_cfg=base_cfg)
    assert len(hub.class_labels(model)) == 1000 and hub.class_labels(model)[0].startswith('tench')


def test_warm_start_trains(fake_hub):
    """gn and conv3x3 get gradient at the first step; conv1x1 once gn.weight has left zero."""
    serve_base(fake_hub, 'resnet18_ema')
    model = timm.create_model('resnet18_ema', pretrained=True, num_classes=4).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        emas = [m for m in model.modules() if isinstance(m, EMA)]
        grads = {part: max(getattr(m, part).weight.grad.abs().max().item() for m in emas)
                 for part in ('gn', 'conv3x3', 'conv1x1')}
        opt.step()
        return grads

    first = step()
    assert first['gn'] > 0 and first['conv3x3'] > 0
    assert first['conv1x1'] == 0
    assert step()['conv1x1'] > 0


def test_pretrained_with_new_head_in_chans_and_features(fake_hub):
    base = serve_base(fake_hub, 'resnet50_ema')
    model = timm.create_model('resnet50_ema', pretrained=True, num_classes=10, in_chans=1)
    assert model.fc.out_features == 10 and model.conv1.in_channels == 1
    feats = timm.create_model('resnet50_ema', pretrained=True, features_only=True, out_indices=(2, 4)).eval()
    base_feats = timm.create_model('resnet50', features_only=True, out_indices=(2, 4)).eval()
    base_feats.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith('fc.')})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(feats(x), base_feats(x)):
            assert _rel_err(a, b) <= 1e-5


def test_mobilenet_features_only_pretrained(fake_hub):
    serve_base(fake_hub, 'mobilenetv2_100_ema')
    feats = timm.create_model('mobilenetv2_100_ema', pretrained=True, features_only=True)
    assert len(feats(torch.randn(1, 3, 64, 64))) == 5


# --- class names: a cfg names the classes of its own head only ---

def _timm_labeller(model):
    """How timm's inference.py labels a model's outputs (timm.data's own classes): the cfg's label names, else the
    ImageNet subset the head size implies; None where it labels nothing."""
    cfg = model.pretrained_cfg
    if cfg.get('label_names') is not None:
        info = timm.data.CustomDatasetInfo(cfg['label_names'], cfg.get('label_descriptions'))
    elif (subset := timm.data.infer_imagenet_subset({'num_classes': getattr(model, 'num_classes', 0)})) is not None:
        info = timm.data.ImageNetInfo(subset)
    else:
        return None
    return timm.data.DatasetInfoLabelMapper(info, label_type='description')


@pytest.mark.parametrize('name', ['resnet18_ema', 'mobilenetv2_100_ema', 'convnext_tiny_ema'])
def test_only_the_default_head_has_the_cfgs_class_names(name):
    """The default head keeps its ImageNet names; a new head (another size, none, a feature extractor) gets none,
    as timm's own models do, where timm's inference.py labelled a 2-class head tench and goldfish."""
    labeller = _timm_labeller(timm.create_model(name))
    assert labeller.coverage(1000) == (1000, 0, 0)
    assert [labeller(i) for i in range(1000)] == hub.class_labels(timm.create_model(name))
    for kwargs in (dict(num_classes=2), dict(num_classes=0), dict(features_only=True)):
        model = timm.create_model(name, **kwargs)
        assert not {'label_names', 'label_descriptions'} & set(model.pretrained_cfg), kwargs
        assert model.default_cfg is model.pretrained_cfg
        assert _timm_labeller(model) is None and hub.label_names(model) is None
        assert _timm_labeller(timm.create_model(VARIANTS[name].base, **kwargs)) is None  # as for the base


@pytest.mark.parametrize('add_ema', [False, True])
def test_a_saved_folder_keeps_its_own_class_names(tmp_path, add_ema):
    """A fine-tuned folder's class names (config.json) load and label its head, ResNet variant or grafted; loaded
    with another head, it has none."""
    torch.manual_seed(0)
    model = acting(hub.create_model('resnet18', add_ema=True, pretrained=False, num_classes=len(LABELS)) if add_ema
                   else timm.create_model('resnet18_ema', num_classes=len(LABELS)))
    folder = hub.save_pretrained(model, tmp_path / 'run', label_names=LABELS)
    loaded = timm.create_model(f'local-dir:{folder}')
    assert hub.class_labels(loaded) == LABELS
    assert [_timm_labeller(loaded)(i) for i in range(len(LABELS))] == LABELS
    assert _timm_labeller(timm.create_model(f'local-dir:{folder}', num_classes=3)) is None


# --- what timm's pretrained filter checks: each fault a specific exception with a one-line message ---

def _one_line(error) -> str:
    text = str(error.value)
    assert '\n' not in text
    return text


def test_shape_mismatch_through_hub(fake_hub):
    wrong = random_base('resnet34')  # a resnet34 checkpoint where resnet18's is expected
    fake_hub.add_file('timm/resnet18.a1_in1k', 'model.safetensors', safetensors.torch.save(wrong.state_dict()))
    with pytest.raises((ShapeMismatchError, CheckpointKeysError)) as e:
        hub.create_model('resnet18_ema')
    assert _one_line(e).startswith('timm/resnet18.a1_in1k ')  # names the checkpoint's repo
    assert isinstance(e.value, CheckpointKeysError) and 'layer1.2.conv1.weight' in e.value.unknown


def test_shape_mismatch_through_hub_names_the_repo_and_shapes(fake_hub):
    torch.manual_seed(0)
    ten = timm.create_model('resnet18', num_classes=10)  # a base checkpoint with a 10-class head
    fake_hub.add_file('timm/resnet18.a1_in1k', 'model.safetensors', safetensors.torch.save(ten.state_dict()))
    with pytest.raises(ShapeMismatchError) as e:
        hub.create_model('resnet18_ema')
    assert e.value.key == 'fc.weight' and e.value.checkpoint_shape == (10, 512) and e.value.model_shape == (1000, 512)
    assert _one_line(e).startswith('timm/resnet18.a1_in1k does not fit the model')
    # A new head (and a stem for other input channels) is timm's to adapt: not a mismatch.
    model = hub.create_model('resnet18_ema', num_classes=7, in_chans=1)
    assert model.fc.out_features == 7 and model.conv1.in_channels == 1


def _model_and_state(num_classes=5):
    torch.manual_seed(0)
    model = timm.create_model('resnet18_ema', num_classes=num_classes)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_check_state_dict_accepts_the_models_own_state():
    model, state = _model_and_state()
    check_state_dict(state, model, 'x.safetensors')
    # BatchNorm's step counters carry no weights: leaving them out is fine.
    check_state_dict({k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}, model, 'x')


def test_check_state_dict_names_the_first_mismatch_in_model_order():
    model, state = _model_and_state()
    state['fc.weight'] = torch.zeros(3, 512)
    state['conv1.weight'] = torch.zeros(64, 1, 7, 7)
    with pytest.raises(ShapeMismatchError) as e:
        check_state_dict(state, model, 'w.safetensors')
    assert e.value.key == 'conv1.weight' and e.value.checkpoint_shape == (64, 1, 7, 7)
    assert _one_line(e).startswith('w.safetensors does not fit the model')
    # keys the loader adapts itself are left out of the check
    check_state_dict(state, model, 'w.safetensors', adapted={'fc.weight', 'conv1.weight'})


def test_check_state_dict_lists_unknown_and_missing_keys():
    model, state = _model_and_state()
    state['extra.weight'] = torch.zeros(2)
    del state['layer1.0.se.gn.weight']
    with pytest.raises(CheckpointKeysError) as e:
        check_state_dict(state, model, 'w.safetensors')
    assert e.value.unknown == ['extra.weight'] and e.value.missing == ['layer1.0.se.gn.weight']
    assert 'w.safetensors does not match resnet18_ema' in _one_line(e)
    with pytest.raises(CheckpointKeysError) as e:
        check_state_dict(state, model, 'w.safetensors', adapted={'extra.weight'})
    assert e.value.unknown == [] and e.value.missing == ['layer1.0.se.gn.weight']


def test_filter_warm_starts_base_checkpoints_and_passes_ema_checkpoints():
    base = random_base('resnet18')
    model = timm.create_model('resnet18_ema', num_classes=10, in_chans=1)  # head and stem adapted by timm
    state = checkpoint_filter_fn(base.state_dict(), model)
    assert set(state) == set(model.state_dict())
    assert not state['layer1.0.se.gn.weight'].any()
    torch.testing.assert_close(state['layer1.0.bn2.weight'], 2 * base.state_dict()['layer1.0.bn2.weight'])
    _, ema_state = _model_and_state()
    assert as_variant_state(ema_state, model) is ema_state


def test_loads_weights_for_checkpoint_specs():
    assert loads_weights(True, {}) and not loads_weights(False, {})
    assert loads_weights(False, {'source': 'hf-hub'}) and loads_weights(False, {'source': 'local-dir'})
    assert not loads_weights(False, {'source': 'timm'})

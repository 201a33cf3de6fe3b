"""The variants: registered with timm, EMA in the right places, the base architecture otherwise unchanged."""
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import ema_hub
from ema_hub import EMA, VARIANTS
from ema_hub.registry import BASE_RESULTS, default_tag
from ema_hub.errors import UnknownModelError
from ema_hub.reference import with_reference_layers
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.convnext import ConvNeXtBlock

from ema_hub.graft import ChannelsLastEMA

NAMES = list(VARIANTS)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_listed_by_timm():
    """Every pretrained tag of every base is a warm tag."""
    assert sorted(timm.list_models('*_ema')) == sorted(NAMES)
    assert sorted(timm.list_models('*_ema', pretrained=True)) == sorted(
        f'{v.name}.warm_{name.split(".", 1)[1]}' for v in VARIANTS.values() for name in timm.list_pretrained(f'{v.base}.*'))


def test_default_tag_follows_the_rule():
    """The most accurate base tag trained on ImageNet-1k alone, at its default size (resnet34's is ra4 since the
    rule was stated; the other earlier variants kept theirs)."""
    for v in VARIANTS.values():
        assert default_tag(v.base, v.base_tags) == v.base_tag, v.name
        assert (v.base_top1, v.base_top5) == BASE_RESULTS[f'{v.base}.{v.base_tag}'][1:]


def test_default_tag_is_warm_start():
    for name, v in VARIANTS.items():
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag == v.warm_tag and cfg.hf_hub_id == v.base_hub_id


def _expected_channels(block):
    """The channels EMA gets in ``block`` under its family's placement, or None where it leaves the block out
    (the paper's timm fork: inverted residuals wider than 144, depthwise-separable blocks wider than 320)."""
    if isinstance(block, ConvNeXtBlock):
        return block.conv_dw.out_channels
    if isinstance(block, (BasicBlock, Bottleneck)):
        return (block.bn3 if hasattr(block, 'bn3') else block.bn2).num_features
    if isinstance(block, InvertedResidual):
        return block.conv_pwl.in_channels if block.conv_pwl.in_channels > 144 else None
    return block.conv_pw.in_channels if block.conv_pw.in_channels > 320 else None


def _ema_of(block):
    """The block's EMA: its attention slot, after the block's own squeeze-excitation in it, or (ConvNeXt) the
    MLP's last slot."""
    if isinstance(block, ConvNeXtBlock):
        return block.mlp.drop2.ema if isinstance(block.mlp.drop2, ChannelsLastEMA) else None
    if isinstance(block.se, EMA):
        return block.se
    if isinstance(block.se, torch.nn.Sequential) and isinstance(block.se[-1], EMA):
        return block.se[-1]
    return None


@pytest.mark.parametrize('name', NAMES)
def test_placement_and_parameters(name):
    v = VARIANTS[name]
    model, base = timm.create_model(name, device='meta'), timm.create_model(v.base, device='meta')
    kinds = (BasicBlock, Bottleneck, InvertedResidual, DepthwiseSeparableConv, ConvNeXtBlock)
    blocks = [m for m in model.modules() if isinstance(m, kinds)]
    base_blocks = [m for m in base.modules() if isinstance(m, kinds)]
    emas = [m for m in model.modules() if isinstance(m, EMA)]
    assert len(blocks) == len(base_blocks) > 0
    # EMA where the family's placement puts it, in the block's attention slot, sized to what that slot sees.
    expected = [_expected_channels(b) for b in base_blocks]
    assert [None if _ema_of(b) is None else _ema_of(b).gn.num_channels * _ema_of(b).groups for b in blocks] == expected
    assert len(emas) == sum(c is not None for c in expected) > 0
    # Everything but the EMA layers is the base, parameter for parameter (an SE moves under se.0 beside it).
    ema_keys = {k for name_, m in model.named_modules() if isinstance(m, EMA) for k in
                (f'{name_}.{s}' for s in m.state_dict())}
    rest = {k.replace('.se.0.', '.se.'): t.shape for k, t in model.state_dict().items() if k not in ema_keys}
    assert rest == {k: t.shape for k, t in base.state_dict().items()}
    ema_params = sum(_params(m) for m in emas)
    assert _params(model) == _params(base) + ema_params
    # The registry's card facts are what the model really has.
    assert round(_params(model) / 1e6, 2) == pytest.approx(v.params_m, abs=0.01)
    assert round(_params(base) / 1e6, 2) == pytest.approx(v.base_params_m, abs=0.01)


@pytest.mark.parametrize('name', NAMES)
def test_gmacs_match_registry(name):
    v = VARIANTS[name]

    def gmacs(arch):  # on the meta device: the counter needs shapes only
        model = with_reference_layers(timm.create_model(arch, device='meta')).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224, device='meta'))
        return counter.get_total_flops() / 2e9

    assert gmacs(name) == pytest.approx(v.gmacs, abs=0.01)
    assert gmacs(v.base) == pytest.approx(v.base_gmacs, abs=0.01)


def test_ema_sits_before_residual_add():
    """Zeroing EMA's output must leave only the shortcut: it is on the residual branch, before the add."""
    model = timm.create_model('resnet50_ema').eval()
    block = model.layer2[1]
    x = torch.randn(1, 512, 8, 8)
    block.se.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(x))


def test_mobilenet_ema_after_depthwise():
    model = timm.create_model('mobilenetv2_100_ema').eval()
    assert model.blocks[2][0].conv_pwl.in_channels == 144 and not isinstance(model.blocks[2][0].se, EMA)
    block = model.blocks[2][1]  # 192 wide
    seen = {}
    block.se.register_forward_hook(lambda m, i, o: seen.update(inp=i[0]))
    block.conv_dw.register_forward_hook(lambda m, i, o: seen.update(dw=o))
    block.conv_pwl.register_forward_pre_hook(lambda m, i: seen.update(pwl=i[0]))
    with torch.no_grad():
        block(torch.randn(1, block.conv_pw.in_channels, 16, 16))
        expected_in = block.bn2(seen['dw'])
    torch.testing.assert_close(seen['inp'], expected_in)
    torch.testing.assert_close(seen['pwl'], block.se(expected_in))


def test_efficientnet_ema_after_squeeze_excitation():
    """In a block with squeeze-excitation EMA follows it, before the pointwise projection (the paper's fork)."""
    model = timm.create_model('efficientnet_b0_ema').eval()
    block = next(b for b in model.modules() if isinstance(b, InvertedResidual) and _ema_of(b) is not None)
    seen = {}
    block.se[0].register_forward_hook(lambda m, i, o: seen.update(se=o))
    block.conv_pwl.register_forward_pre_hook(lambda m, i: seen.update(pwl=i[0]))
    with torch.no_grad():
        block(torch.randn(1, block.conv_pw.in_channels, 16, 16))
        torch.testing.assert_close(seen['pwl'], block.se[1](seen['se']))


@pytest.mark.parametrize('name', NAMES)
def test_create_model_kwargs(name):
    model = timm.create_model(name, num_classes=7, in_chans=1, drop_path_rate=0.1)
    out = model(torch.randn(2, 1, 64, 48))
    assert out.shape == (2, 7)
    out.sum().backward()
    emas = [m for m in model.modules() if isinstance(m, EMA)]
    assert emas and all(m.conv3x3.weight.grad is not None for m in emas)


# Materializing a meta model takes the same path in every variant of a family: checked on the smallest of each.
MATERIALIZED = {'resnet18_ema', 'resnet50_ema', 'mobilenetv2_100_ema', 'efficientnet_b0_ema', 'convnext_tiny_ema'}


@pytest.mark.parametrize('name', NAMES)
def test_meta_device(name):
    """Built on the meta device and run there (shapes only, through the operators' fake implementations), as
    timm's own tests do; materialized (``MATERIALIZED``), it computes."""
    model = timm.create_model(name, device='meta', num_classes=3)
    assert all(p.device.type == 'meta' for p in model.parameters())
    out = model(torch.empty(2, 3, 64, 48, device='meta'))
    assert out.device.type == 'meta' and out.shape == (2, 3)
    if name not in MATERIALIZED:
        return
    # materialized as timm does it: empty storage, the checkpoint, then the computed buffers
    torch.manual_seed(0)
    ref = timm.create_model(name, num_classes=3).eval()
    with torch.no_grad():  # weights under which every EMA layer matters (timm zero-inits the last BN of a block)
        for m in ref.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, EMA)):
                for p in m.parameters():
                    p.uniform_(0.5, 1.5)
    model = model.to_empty(device='cpu').eval()
    model.load_state_dict(ref.state_dict())
    from timm.models._manipulate import reinit_non_persistent_buffers
    assert sum(isinstance(m, EMA) for m in model.modules()) == len(
        [n for n in reinit_non_persistent_buffers(model) if isinstance(model.get_submodule(n), EMA)]) > 0
    from ema_hub.layers.algebra import tap_edges
    assert all(torch.equal(m.tap_edges, tap_edges()) for m in model.modules() if isinstance(m, EMA))
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


@pytest.mark.parametrize('name', ['resnet18_ema', 'resnext50_32x4d_ema', 'mobilenetv2_140_ema'])
def test_features_only_matches_base(name):
    v = VARIANTS[name]
    feats = timm.create_model(name, features_only=True, out_indices=(1, 2, 4))
    base = timm.create_model(v.base, features_only=True, out_indices=(1, 2, 4))
    assert feats.feature_info.channels() == base.feature_info.channels()
    assert feats.feature_info.reduction() == base.feature_info.reduction()
    outs = feats(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == base.feature_info.channels()


def test_public_api():
    assert ema_hub.get_variant('resnet50_ema.warm_a1_in1k') is VARIANTS['resnet50_ema']
    with pytest.raises(UnknownModelError, match="unknown model 'resnet51_ema'; use one of resnet18_ema, ") as e:
        ema_hub.get_variant('resnet51_ema')
    assert 'resnet50_ema' in str(e.value) and isinstance(e.value, ValueError)

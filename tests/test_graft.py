"""``ema_hub.add_ema``: EMA grafted into built models keeps their function exactly, and the grafted models train,
save, load, compile and export."""
import copy

import pytest
import timm
import torch
from torch import nn

import ema_hub
from ema_hub.errors import UsageError
from ema_hub.graft import grafted_layers
from ema_hub.pretrained import warm_start_state_dict
from support.models import acting, rel_err

X = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))


def _nontrivial_bn(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (and ConvNeXt layer scales), so that a wrong fold would
    show; unlike ``support.models.acting``, it also sets the layer scales and leaves any EMA at its start."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, 'gamma', None), nn.Parameter):  # timm inits it to 1e-6: blocks near identity
                m.gamma.normal_(0.5, 0.2, generator=gen)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.normal_(1.0, 0.3, generator=gen)
                m.bias.normal_(0.0, 0.3, generator=gen)
    return model.eval()


class SmallCNN(nn.Module):
    """A plain PyTorch CNN whose forward reads attributes of its layers, as ultralytics' models read .f and .i."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.SiLU()),
            nn.Sequential(nn.Conv2d(40, 32, 1), nn.ReLU()),
        ])
        for i, layer in enumerate(self.layers):
            layer.f, layer.i = (-1 if i < 2 else [0, 1]), i
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        outputs = []
        for layer in self.layers:
            if layer.f != -1:  # a concatenation of earlier outputs, resized to the last one's size
                size = outputs[-1].shape[2:]
                x = torch.cat([nn.functional.interpolate(outputs[j], size=size) for j in layer.f], 1)
            x = layer(x)
            outputs.append(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize('name,layers', [('resnet50d', 16), ('resnet18', 8), ('mobilenetv2_100', 13),
                                         ('mobilenetv3_large_100', 9), ('efficientnet_b0', 12), ('convnext_tiny', 18)])
def test_timm_family_keeps_function(name, layers):
    base = _nontrivial_bn(timm.create_model(name, num_classes=7))
    with torch.no_grad():
        want = base(X)
    grafted = ema_hub.add_ema(copy.deepcopy(base))
    assert sum(isinstance(m, ema_hub.EMA) for m in grafted.modules()) == layers
    with torch.no_grad():
        assert rel_err(grafted(X), want) <= 1e-5


@pytest.mark.parametrize('name', ['resnet50', 'efficientnet_b0'])
def test_timm_family_graft_is_the_variants_warm_start(name):
    base = _nontrivial_bn(timm.create_model(name, num_classes=7))
    variant = timm.create_model(f'{name}_ema', num_classes=7).eval()
    variant.load_state_dict(warm_start_state_dict(base.state_dict(), variant))
    grafted = ema_hub.add_ema(copy.deepcopy(base))
    got, want = grafted.state_dict(), variant.state_dict()
    assert got.keys() == want.keys()
    # everything but conv1x1's random init (which cannot act while gn.weight is zero) is the warm start's
    assert all(torch.equal(got[k], want[k]) for k in got if '.conv1x1.' not in k)
    with torch.no_grad():
        torch.testing.assert_close(grafted(X), variant(X), rtol=0, atol=0)


def test_timm_model_without_known_blocks_or_with_attention_is_refused():
    with pytest.raises(UsageError, match='after='):
        ema_hub.add_ema(SmallCNN())
    with pytest.raises(UsageError, match='already has an attention layer'):
        ema_hub.add_ema(timm.create_model('seresnet18'))
    # ConvNeXt's site needs the linear MLP's last slot and the layer scale the warm start folds into
    with pytest.raises(UsageError, match='has use_conv_mlp set'):
        ema_hub.add_ema(timm.create_model('convnext_atto', conv_mlp=True))
    with pytest.raises(UsageError, match='has no gamma'):
        ema_hub.add_ema(timm.create_model('convnextv2_atto', conv_mlp=False))


def test_any_module_keeps_function_and_attributes():
    base = _nontrivial_bn(SmallCNN())
    with torch.no_grad():
        want = base(X)
    grafted = ema_hub.add_ema(copy.deepcopy(base), after=['layers.0', 'layers.2'])
    # an nn.Sequential runs every child it holds: EMA joins its last layer, whose output is the Sequential's
    assert grafted_layers(grafted) == ['layers.0.2', 'layers.2.1']
    assert [layer.f for layer in grafted.layers] == [-1, -1, [0, 1]] and grafted.layers[2].i == 2
    assert grafted.layers[0][2].ema.conv1x1.in_channels * grafted.layers[0][2].ema.groups == 16
    with torch.no_grad():
        assert rel_err(grafted(X), want) <= 1e-5
    # the base's keys stay as they were; EMA's are added beside them
    assert set(base.state_dict()) < set(grafted.state_dict())
    assert 'layers.0.2.ema.gn.weight' in grafted.state_dict()


def test_grafted_module_trains_saves_and_loads():
    torch.manual_seed(0)
    grafted = ema_hub.add_ema(_nontrivial_bn(SmallCNN()), after=['layers.1']).train()
    ema = grafted.layers[1][2].ema
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    opt = torch.optim.SGD(grafted.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(grafted(X), torch.tensor([1, 3])).backward()
        assert all(p.grad is not None for p in ema.parameters())
        opt.step()
    assert any(not torch.equal(before[k], v) for k, v in ema.state_dict().items() if k.startswith('gn.'))
    fresh = ema_hub.add_ema(SmallCNN(), after=['layers.1'])
    fresh.load_state_dict(grafted.state_dict())  # strict
    grafted.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), grafted(X), rtol=0, atol=0)


def test_grafted_module_compiles_and_exports(tmp_path):
    torch.manual_seed(0)
    grafted = acting(ema_hub.add_ema(SmallCNN(), after=['layers.0', 'layers.1']))
    with torch.no_grad():
        want = grafted(X)
        got = torch.compile(grafted, fullgraph=True)(X)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    pytest.importorskip('onnxruntime')
    from ema_hub.export import export_module
    report = export_module(grafted, tmp_path / 'grafted.onnx', tuple(X.shape))
    assert max(report.max_rel_diff.values()) < 1e-4


@pytest.mark.parametrize('after,match', [
    (['layers.9'], 'not a submodule'),
    (['head'], 'not a 4-D feature map'),
    (['layers.0.3'], 'not a submodule'),
])
def test_bad_names_are_explained(after, match):
    with pytest.raises(UsageError, match=match):
        ema_hub.add_ema(SmallCNN(), after=after)


def test_zero_channels_are_explained():
    class Empty(nn.Module):
        def forward(self, x):
            return x[:, :0]

    net = nn.Sequential(nn.Conv2d(3, 4, 1), Empty())
    with pytest.raises(UsageError, match='0 channels'):
        ema_hub.add_ema(net, after=['1'])

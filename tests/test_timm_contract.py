"""timm's model contract for the EMA variants: the checks of timm's own tests/test_models.py, replicated with
stronger oracles.

CI runs timm's own tests/test_models.py on one variant per model class and kind of block (``.ci/run``: from the
source distribution of the installed timm, meta device included). Here the same checks run on one variant per
kind of block EMA sits in (``NAMES``: a basic block, a bottleneck, inverted residuals with and without
squeeze-excitation, a ConvNeXt block), compared with the eager model where timm only asks for shapes;
torch.compile and torch.export run on resnet50_ema. Each test names the timm test it mirrors. Where timm only
asserts shapes and the absence of NaNs (TorchScript, FX + TorchScript) the eager model is the oracle here, and
where timm's contract is silent on something EMA could break (EMA parameters' gradients, whether grad
checkpointing really recomputes, features_only keeping EMA) the test says so.

Weights: timm's ResNet init makes every EMA layer of a ResNet see zeros (see ``_create``), so comparisons run
on "non-trivial" weights; timm's own init is still checked where timm checks it (forward, backward).
Inputs are smaller than timm's (2 CPU cores); every size keeps the last stage at least 2x2, since EMA's
GroupNorm of a 1x1 map is identically zero.

Not replicated, because they do not apply to these models:
* test_model_inference: runs only timm's own ``test_*`` models against reference tensors timm hosts on the Hub.
* test_model_default_cfgs_non_std: for transformer / hybrid models (timm's NON_STD_FILTERS); every variant here
  is a standard CNN, so test_model_default_cfgs applies instead. Its one extra check (pooled width after
  ``create_model(num_classes=0)``) is in test_model_default_cfgs below anyway.
* test_naflexvit_* / test_gemma4_*: specific to those timm architectures.
test_model_forward_torchscript_with_features_fx, which timm runs on regnetx_002 only, runs here on every variant
(test_model_features_fx_torchscript).
"""
import math
import re

import pytest
import safetensors.torch
import timm
import torch
from torch import nn
from timm import set_scriptable
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from timm.models._manipulate import adapt_input_conv

from ema_hub import EMA, VARIANTS

# One variant per kind of block that holds EMA (the others repeat these blocks at other widths and depths).
NAMES = ['resnet18_ema', 'resnet50_ema', 'mobilenetv3_large_100_ema', 'convnext_tiny_ema']

# TorchScript is deprecated upstream but still part of timm's contract (and tested by timm).
pytestmark = [
    pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning'),
    pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support:UserWarning"),
]

# timm's target sizes (in parentheses) reduce the default 224 input; ours are smaller still for 2 CPU cores.
FWD_SIZE = 128      # test_model_forward (TARGET_FWD_SIZE 384, so 224)
BWD_SIZE = 128      # test_model_backward (TARGET_BWD_SIZE 128)
FFEAT_SIZE = 96     # test_model_forward_features & intermediates (TARGET_FFEAT_SIZE 96)
JIT_SIZE = 64       # TorchScript tests (TARGET_JIT_SIZE 128)
FX_SIZE = 64        # FX tests (TARGET_FWD_FX_SIZE / TARGET_BWD_FX_SIZE 128)
RTOL = 1e-4


def _create(name, nontrivial=True, **kwargs):
    """The model, seeded; with ``nontrivial`` (the default) its weights made such that EMA has work to do.

    timm's ResNet init zeroes the last BatchNorm of every block (zero_init_last), the layer right before EMA:
    at init every EMA layer of a ResNet sees an all-zero map and returns zeros, whatever its implementation,
    so output and gradient comparisons would not exercise EMA at all (ConvNeXt's layer scale of 1e-6 after it
    nearly so); EMA's own GroupNorm starts at weight 1, bias 0 (a uniform softmax). So: random affine parameters
    for every norm layer, layer scales near 1 and random EMA conv biases, then BatchNorm running statistics
    taken from one training-mode batch, to keep eval mode well scaled.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if nontrivial:
        g = torch.Generator().manual_seed(3)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
                if isinstance(m, EMA):
                    for conv in (m.conv1x1, m.conv3x3):
                        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.5)
                if isinstance(getattr(m, 'gamma', None), nn.Parameter):  # ConvNeXt's layer scale starts at 1e-6
                    m.gamma.copy_(torch.rand(m.gamma.shape, generator=g) + 0.5)
            momenta = [m.momentum for m in bns]
            for m in bns:
                m.momentum = 1.0  # running statistics := this batch's
            model.train()
            model(torch.randn(2, 3, 64, 64, generator=g))
            for m, momentum in zip(bns, momenta):
                m.momentum = momentum
    return model.train()


def _assert_close(actual, expected, rtol=RTOL, what=''):
    """Equal up to rtol, relative to each element or to the tensor's largest magnitude (for elements near 0)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item(),
                               msg=(lambda m: f'{what}: {m}') if what else None)


def _assert_same_function_fp64(scripted, model, x, what=''):
    """TorchScript compiles EMA's op-by-op form and eager runs its fast path: two summation orders, so in
    fp32 their outputs differ by rounding, which an ill-conditioned random network amplifies past 1e-4
    (a mobilenet here, where the paper's form itself is 2.7e-4 from the fp64 result). In fp64 the two must
    agree to 1e-9."""
    scripted, model = scripted.double(), model.double()
    with torch.no_grad():
        expected, out = model(x.double()), scripted(x.double())
    for o, e in (zip(out, expected) if isinstance(out, list) else [(out, expected)]):
        _assert_close(o, e, rtol=1e-9, what=what)


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _ema_params(model):
    """Names of the parameters that belong to EMA layers."""
    ema = {id(p) for m in model.modules() if isinstance(m, EMA) for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ema}


def _assert_all_grads(model, num_params, ema_nonzero=True, ema_names=None):
    """timm's backward check (every parameter has a gradient, all of them counted), plus: every gradient is
    finite, EMA has parameters, and (``ema_nonzero``) no EMA parameter's gradient is all zero."""
    named = dict(model.named_parameters())
    for n, p in named.items():
        assert p.grad is not None, f'No gradient for {n}'
        assert torch.isfinite(p.grad).all(), f'non-finite gradient for {n}'
    assert sum(p.grad.numel() for p in named.values()) == num_params, 'Some parameters are missing gradients'
    ema = _ema_params(model) if ema_names is None else ema_names  # a GraphModule has no EMA modules left
    assert ema, 'no EMA parameters found'
    if ema_nonzero:
        for n in sorted(ema):
            assert named[n].grad.abs().sum() > 0, f'EMA parameter {n} gets no gradient'


@pytest.fixture
def jit_profiling_off():
    """timm's test_models.py switches the profiling executor's profiling off at import (compiling big models
    with the legacy executor is too slow for unit tests); here per test, and put back afterwards."""
    executor = torch._C._jit_set_profiling_executor(True)
    mode = torch._C._jit_set_profiling_mode(False)
    yield
    torch._C._jit_set_profiling_mode(mode)
    torch._C._jit_set_profiling_executor(executor)


class _TimmTracer(torch.fx.Tracer):
    """The tracing of timm's _create_fx_model: torch.fx with timm's registered leaf modules and autowrapped
    functions (its tracer_kwargs). timm goes through torchvision's NodePathTracer, the same tracer plus node
    naming for feature extraction; that naming makes it ~10x slower on these graphs (resnet152_ema has 7,800
    nodes), and the whole model's output needs none. torchvision's path is covered by the features-FX test."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(get_notrace_functions()), param_shapes_constant=True)
        self.leaf_modules = tuple(get_notrace_modules())

    def is_leaf_module(self, m, module_qualname):
        return isinstance(m, self.leaf_modules) or super().is_leaf_module(m, module_qualname)


def _fx_model(model):
    """The model symbolically traced in its current mode (train / eval), as a GraphModule sharing its weights.
    EMA is one of timm's leaf modules (as its non-local attention, norm-act and same-padding layers are): the
    graph calls it, so it runs the same fast path as eager. Its op-by-op form is what TorchScript compiles
    (tests below)."""
    assert EMA in get_notrace_modules()
    return torch.fx.GraphModule(model, _TimmTracer().trace(model))


def test_every_kind_of_block_is_covered():
    """Every variant's EMA blocks are of a kind some variant in NAMES has."""
    def kinds(name):
        model = timm.create_model(name, device='meta')  # structure only
        return {type(m).__name__ for m in model.modules() if any(isinstance(c, EMA) for c in m.children())}
    covered = set().union(*(kinds(n) for n in NAMES))
    assert sorted(timm.list_models('*_ema')) == sorted(VARIANTS)
    for name in VARIANTS:
        assert kinds(name) and kinds(name) <= covered, name


# --- timm: test_model_forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
def test_model_forward(name):
    """Forward in eval mode, timm's init (which must not give NaNs, though it feeds ResNets' EMA zeros) and
    ours; then with grad checkpointing on, the same output. timm tolerates models without grad checkpointing;
    ResNet and EfficientNet have it, so here it must work."""
    x = _randn(1, 3, FWD_SIZE, FWD_SIZE)
    out = _create(name, nontrivial=False).eval()(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()

    model = _create(name).eval()
    emas = [m for m in model.modules() if isinstance(m, EMA)]
    stds = []
    for m in emas:
        m.register_forward_hook(lambda mod, inp, o: stds.append((inp[0].std().item(), o.std().item())))
    out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    # every EMA layer has a non-constant input and output: the comparisons in this file exercise EMA
    assert len(stds) == len(emas) > 0 and all(i > 0 and o > 0 for i, o in stds)
    model.set_grad_checkpointing()
    assert any(getattr(m, 'grad_checkpointing', False) for m in model.modules())  # the model's, or its stages'
    _assert_close(model(x), out)


@pytest.mark.parametrize('name', NAMES)
def test_grad_checkpointing_backward(name):
    """Beyond timm (which compares eval outputs only): in training, checkpointing really recomputes the blocks
    in backward (EMA runs more often) and gives the same output and gradients."""
    x = _randn(2, 3, 64, 64)
    results = []
    for ckpt in (False, True):
        model = _create(name).train()
        model.set_grad_checkpointing(ckpt)
        calls = []
        for m in model.modules():
            if isinstance(m, EMA):
                m.register_forward_hook(lambda *_: calls.append(1))
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)))
    (out, grads, calls), (out_ckpt, grads_ckpt, calls_ckpt) = results
    assert calls_ckpt > calls > 0, 'grad checkpointing did not recompute the EMA blocks'
    _assert_close(out_ckpt, out)
    assert grads_ckpt.keys() == grads.keys()
    for n, g in grads.items():
        _assert_close(grads_ckpt[n], g, rtol=1e-3, what=f'grad of {n}')


# --- timm: test_model_backward -----------------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('nontrivial', [False, True], ids=['timm_init', 'nontrivial'])
def test_model_backward(name, nontrivial):
    """Every parameter gets a finite gradient, at timm's init and ours; with ours, every EMA parameter a
    non-zero one (at timm's init a ResNet's EMA layers see zeros, and their parameters get zero gradient)."""
    model = _create(name, nontrivial=nontrivial, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    out = model(_randn(2, 3, BWD_SIZE, BWD_SIZE))
    out.mean().backward()
    assert out.shape == (2, 42)
    assert torch.isfinite(out).all()
    _assert_all_grads(model, num_params, ema_nonzero=nontrivial)


# --- timm: test_model_default_cfgs (and the num_classes=0 check of test_model_default_cfgs_non_std) -------------
@pytest.mark.parametrize('name', NAMES)
def test_model_default_cfgs(name):
    model = _create(name).eval()
    assert model.num_classes == 1000 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    pool_size, input_size = cfg['pool_size'], cfg['input_size']
    assert max(input_size) <= 448  # timm checks output sizes at the default resolution up to 448
    x = _randn(1, *input_size)

    with torch.no_grad():
        # forward_features is unpooled, its spatial size the cfg's pool_size at the default input size
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape == (1, model.num_features, *pool_size)
        assert pre.shape == (1, model.head_hidden_size)
        logits = model.forward_head(feats)
        _assert_close(model(x), logits)

        # classifier removed: the output is the pooled features, forward_head(pre_logits=True)'s
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == (1, model.head_hidden_size) == pre.shape
        _assert_close(pooled, pre)

        # classifier and global pooling removed: unpooled features again, but for MobileNetV3, which pools
        # before its head convolution (timm's own test makes the same exception); the same values where no
        # norm is left in the head (ConvNeXt's head keeps its norm)
        model.reset_classifier(0, '')
        out = model(x)
        assert out.dim() == 4
        pools_last = not isinstance(model, timm.models.MobileNetV3)
        if pools_last:
            assert out.shape == feats.shape
        if isinstance(model, (timm.models.ResNet, timm.models.EfficientNet)):  # no norm left in their heads
            _assert_close(out, feats)

        # the same through __init__
        out = _create(name, nontrivial=False, num_classes=0, global_pool='').eval()(x)
        assert out.dim() == 4 and (out.shape == feats.shape or not pools_last)
        # test_model_default_cfgs_non_std: num_classes=0 through __init__ gives the pooled pre-logits
        out = _create(name, nontrivial=False, num_classes=0).eval()(x)
        assert out.shape == (1, model.head_hidden_size)

    # the cfg names the classifier and the first conv(s) as they are in the state dict
    classifier = cfg['classifier']
    for c in (classifier,) if isinstance(classifier, str) else classifier:
        assert state_dict[f'{c}.weight'].shape[0] == cfg['num_classes']
    first_conv = cfg['first_conv']
    for fc in (first_conv,) if isinstance(first_conv, str) else first_conv:
        assert state_dict[f'{fc}.weight'].shape[1] == input_size[0]


# --- timm: test_model_forward_features (and test_model_features_pretrained below) --------------------------------
def _check_features(outputs, feature_info, batch_size, size):
    """timm's features check: one output per feature_info entry, its channels, and its spatial size within the
    reduction's (exactly it here: the input is a multiple of every reduction), no NaNs."""
    channels, reduction = feature_info.channels(), feature_info.reduction()
    assert len(channels) >= 3
    assert len(outputs) == len(channels)
    for c, r, o in zip(channels, reduction, outputs):
        assert o.shape[:2] == (batch_size, c)
        assert o.shape[2] <= math.ceil(size / r) + 1 and o.shape[3] <= math.ceil(size / r) + 1
        assert o.shape[2:] == (size // r, size // r)
        assert torch.isfinite(o).all()


@pytest.mark.parametrize('name', NAMES)
def test_model_forward_features(name):
    model = _create(name, features_only=True).eval()
    assert any(isinstance(m, EMA) for m in model.modules()), 'features_only model lost its EMA layers'
    base = timm.create_model(VARIANTS[name].base, features_only=True, device='meta')
    assert model.feature_info.reduction() == base.feature_info.reduction()
    with torch.no_grad():
        outputs = model(_randn(1, 3, FFEAT_SIZE, FFEAT_SIZE))
    _check_features(outputs, model.feature_info, 1, FFEAT_SIZE)


def _full_key(key: str, full) -> str:
    """A features_only model's key in the full model: the same, or without the getter wrapper's ``model.``
    prefix, or with the first level of a flattened sequential (``stages_0.`` for ``stages.0.``) unflattened."""
    for candidate in (key, key.removeprefix('model.'), re.sub(r'^([A-Za-z]+)_(\d+)\.', r'\1.\2.', key)):
        if candidate in full:
            return candidate
    raise KeyError(key)


def _load_from(feat_model, model):
    """Give a features_only model the full model's weights (``_full_key``); every key must be there (strict)."""
    src = model.state_dict()
    feat_model.load_state_dict({k: src[_full_key(k, src)] for k in feat_model.state_dict()})


# --- timm: test_model_forward_intermediates_features, test_model_forward_intermediates ---------------------------
@pytest.mark.parametrize('name', NAMES)
def test_model_forward_intermediates(name):
    """forward_intermediates() and the features_only wrappers (timm's default and feature_cls='getter'), given
    the full model's weights, return the same feature maps; the final one is forward_features'; grad
    checkpointing changes nothing."""
    model = _create(name).eval()
    feature_info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = _randn(1, 3, FFEAT_SIZE, FFEAT_SIZE)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
        _check_features(intermediates, feature_info, 1, FFEAT_SIZE)
        torch.testing.assert_close(final, model.forward_features(x))
        for feature_cls in ('getter', None):
            kwargs = {'feature_cls': feature_cls} if feature_cls else {}
            feat_model = _create(name, nontrivial=False, features_only=True, **kwargs).eval()
            assert feat_model.feature_info.channels() == feature_info.channels()
            _load_from(feat_model, model)
            outputs = feat_model(x)
            _check_features(outputs, feat_model.feature_info, 1, FFEAT_SIZE)
            for o, i in zip(outputs, intermediates):
                _assert_close(o, i)
    model.set_grad_checkpointing()
    final_ckpt, _ = model.forward_intermediates(x, output_fmt='NCHW')
    _assert_close(final_ckpt, final)


# --- timm: test_model_forward_torchscript ------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
def test_model_forward_torchscript(name, jit_profiling_off):
    with set_scriptable(True):
        model = _create(name).eval()
    x = _randn(1, 3, JIT_SIZE, JIT_SIZE)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        out = scripted(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    _assert_same_function_fp64(scripted, model, x)


# --- timm: test_model_forward_fx ---------------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
def test_model_forward_fx(name):
    model = _create(name).eval()
    x = _randn(1, 3, FX_SIZE, FX_SIZE)
    with torch.inference_mode():
        expected = model(x)
        out = _fx_model(model)(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert torch.equal(out, expected)  # timm asks for bit-identical output


# --- timm: test_model_backward_fx --------------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
def test_model_backward_fx(name):
    """timm's FX backward (every parameter of the traced model gets a gradient), plus: the traced graph's
    output and gradients are the eager model's."""
    x = _randn(2, 3, FX_SIZE, FX_SIZE)
    eager = _create(name, num_classes=42).train()
    expected = eager(x)
    expected.mean().backward()
    model = _create(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    fx_model = _fx_model(model)
    out = fx_model(x)
    out.mean().backward()
    assert out.shape == (2, 42)
    _assert_close(out, expected)
    _assert_all_grads(fx_model, num_params, ema_names=_ema_params(model))
    eager_grads = dict(eager.named_parameters())
    for n, p in fx_model.named_parameters():
        _assert_close(p.grad, eager_grads[n].grad, rtol=1e-3, what=f'grad of {n}')


# --- timm: test_model_forward_fx_torchscript ---------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
def test_model_forward_fx_torchscript(name, jit_profiling_off):
    with set_scriptable(True):
        model = _create(name).eval()
    x = _randn(1, 3, JIT_SIZE, JIT_SIZE)
    scripted = torch.jit.script(_fx_model(model))
    with torch.inference_mode():
        out = scripted(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    _assert_same_function_fp64(scripted, model, x)


# --- timm: test_model_forward_torchscript_with_features_fx (timm: regnetx_002 only) ------------------------------
@pytest.mark.parametrize('name', NAMES)
def test_model_features_fx_torchscript(name, jit_profiling_off):
    with set_scriptable(True):
        model = _create(name, features_only=True, feature_cfg={'feature_cls': 'fx'}).eval()
    x = _randn(1, 3, JIT_SIZE, JIT_SIZE)
    scripted = torch.jit.script(model)
    with torch.inference_mode():
        outputs = scripted(x)
    assert isinstance(outputs, list)
    _check_features(outputs, model.feature_info, 1, JIT_SIZE)
    _assert_same_function_fp64(scripted, model, x)


# --- timm: test_model_load_pretrained, test_model_features_pretrained --------------------------------------------
@pytest.mark.parametrize('name', NAMES)
def test_model_load_pretrained(name, fake_hub):
    """The default (warm-start) tag loads from the Hub, here the loopback fake one serving a random base
    checkpoint: with in_chans=1 and another classifier, without a classifier, and features_only. timm only
    asks that these load; here the stem is timm's in_chans adaptation of the base's, and the features_only
    model computes the base's feature maps (the warm start's promise, through timm's features_only path)."""
    v = VARIANTS[name]
    base_sd = _create(v.base).state_dict()  # non-trivial: timm's init would zero the layers EMA's warm start folds
    base = _create(v.base, nontrivial=False, features_only=True).eval()
    fake_hub.add_file(v.base_hub_id, 'model.safetensors', safetensors.torch.save(base_sd))
    stem = timm.models.get_pretrained_cfg(name).first_conv + '.weight'

    for num_classes in (5, 0):
        model = timm.create_model(name, pretrained=True, in_chans=1, num_classes=num_classes)
        assert model.num_classes == num_classes
        torch.testing.assert_close(model.state_dict()[stem], adapt_input_conv(1, base_sd[stem]))

    model = timm.create_model(name, pretrained=True, features_only=True).eval()
    base.load_state_dict({k: base_sd[_full_key(k, base_sd)] for k in base.state_dict()})
    x = _randn(1, 3, FFEAT_SIZE, FFEAT_SIZE)
    with torch.no_grad():
        outputs = model(x)
        _check_features(outputs, model.feature_info, 1, FFEAT_SIZE)
        for o, e in zip(outputs, base(x)):
            _assert_close(o, e)


# --- beyond timm's suite: torch.compile and torch.export of resnet50_ema on CPU -----------------------------------
def test_resnet50_compile_fullgraph():
    torch._dynamo.reset()
    model = _create('resnet50_ema').eval()
    x = _randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            expected = model(x)
            out = torch.compile(model, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    _assert_close(out, expected)


def test_resnet50_export():
    """Exported with a dynamic batch dimension, run at two batch sizes on inputs it was not traced with."""
    model = _create('resnet50_ema').eval()
    batch = torch.export.Dim('batch', min=1, max=16)
    exported = torch.export.export(model, (_randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},)).module()
    with torch.no_grad():
        for b in (1, 3):
            x = torch.randn(b, 3, 64, 64)
            _assert_close(exported(x), model(x))

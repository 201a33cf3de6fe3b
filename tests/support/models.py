"""Models with random weights for tests: base checkpoints served where warm tags fetch them, "trained" EMA
variants, and a small labelled checkpoint folder in timm's Hub layout."""
import argparse
from pathlib import Path
from typing import Sequence, Tuple

import safetensors.torch
import timm
import torch

from ema_hub import EMA, VARIANTS

__all__ = ['LABELS', 'FAMILIES', 'acting', 'acting_layer', 'grafted_cnn', 'random_base', 'serve_base', 'rel_err',
           'trained_ema', 'tiny_checkpoint', 'train_py_checkpoint']

# The label names of ``tiny_checkpoint``.
LABELS = ['ant', 'bee', 'cat', 'dog', 'eel']


def acting(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with non-trivial BatchNorm statistics and its EMA layers off their warm-start values (random), in
    eval mode: at init timm zeroes the BatchNorm before each EMA (zero_init_last), so no EMA would act."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.2)
            elif isinstance(m, EMA):
                for p in m.parameters():
                    p.normal_(0, 0.3)
    return model.eval()


def acting_layer(channels: int = 64, factor: int = 32, seed: int = 0) -> EMA:
    """An ``EMA(channels, factor)`` (train mode) with every parameter drawn from N(0, 0.5) after
    ``torch.manual_seed(seed)``, so that every term of the layer acts; the layer tests' bounds hold for these draws."""
    torch.manual_seed(seed)
    layer = EMA(channels, factor)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer


def random_base(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A base model with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return acting(timm.create_model(arch, **kwargs))


def serve_base(fake_hub, name: str, tag: str = '') -> torch.nn.Module:
    """Put a random base checkpoint where the variant's warm tag (the default, or ``warm_<tag>``) fetches it, with
    the head that base tag has; return the base model."""
    v = VARIANTS[name]
    tag = tag or v.base_tag
    torch.manual_seed(0)
    base = random_base(v.base, num_classes=timm.models.get_pretrained_cfg(f'{v.base}.{tag}').num_classes)
    fake_hub.add_file(f'timm/{v.base}.{tag}', 'model.safetensors', safetensors.torch.save(base.state_dict()))
    return base


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to the largest magnitude of ``b``."""
    return ((a - b).abs().max() / b.abs().max()).item()


def trained_ema(name: str = 'resnet18_ema', num_classes: int = 5) -> torch.nn.Module:
    """A variant whose every EMA acts (``acting``), with label names, in eval mode."""
    torch.manual_seed(1)
    model = acting(timm.create_model(name, num_classes=num_classes))
    model.pretrained_cfg = dict(model.pretrained_cfg, num_classes=num_classes,
                                label_names=[f'class_{i}' for i in range(num_classes)])
    model.pretrained_cfg.pop('label_descriptions', None)
    return model.eval()


def tiny_checkpoint(folder: Path, labels: Sequence[str] = LABELS) -> Path:
    """A resnet18_ema with random weights, every EMA acting, and ``labels`` as class names, in timm's Hub layout."""
    from ema_hub.hub import create_model, save_pretrained

    torch.manual_seed(0)
    model = acting(create_model('resnet18_ema', pretrained=False, num_classes=len(labels)))
    cfg = dict(model.pretrained_cfg, num_classes=len(labels), label_names=list(labels))
    cfg.pop('label_descriptions', None)
    model.pretrained_cfg = cfg
    return save_pretrained(model, folder)


def train_py_checkpoint(folder: Path, name: str = 'resnet18_ema', num_classes: int = 5,
                        ddp: bool = False) -> Tuple[torch.nn.Module, torch.nn.Module, Path]:
    """``model_best.pth.tar`` as timm's train.py writes it with --model-ema, by its own ``CheckpointSaver``: the args
    (an argparse.Namespace), the optimizer, ``state_dict`` and ``state_dict_ema`` (a ``ModelEmaV3`` that took one
    step, so the two differ). ``ddp``: saved as a script that keeps the wrapper does, every key under ``module.``.
    Returns (the model, the averaged model, the file), in eval mode."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    model = trained_ema(name, num_classes)
    averaged = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # small: more blows the outputs up
    averaged.update(model)  # half the old weights, half the new
    args = argparse.Namespace(model=name, num_classes=num_classes, lr=0.1, model_ema=True, model_ema_decay=0.5)
    saver = CheckpointSaver(torch.nn.DataParallel(model) if ddp else model, torch.optim.SGD(model.parameters()),
                            args=args, model_ema=averaged, checkpoint_dir=str(folder), recovery_dir=str(folder),
                            **({'unwrap_fn': lambda m: m} if ddp else {}))
    folder.mkdir(parents=True, exist_ok=True)
    saver.save_checkpoint(epoch=0, metric=50.0)
    return model.eval(), averaged.module.eval(), folder / 'model_best.pth.tar'


def grafted_cnn() -> torch.nn.Module:
    """A small CNN of no family ``add_ema`` knows, with EMA grafted after two named layers (its hook form)."""
    import ema_hub
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 5))
    return ema_hub.add_ema(net, after=['2', '5'])


# One model of each kind EMA is built into, 5 classes, random weights: the three families' variants and a graft.
FAMILIES = {
    'resnet': lambda: timm.create_model('resnet18_ema', num_classes=5),
    'efficientnet_builder': lambda: timm.create_model('mobilenetv2_100_ema', num_classes=5),
    'convnext': lambda: timm.create_model('convnext_tiny_ema', num_classes=5),
    'add_ema': grafted_cnn,
}

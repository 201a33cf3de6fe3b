"""Where a classifier looks: class activation maps (pytorch-grad-cam's methods) and EMA's own spatial gates, per
image, in the image's own pixel grid.

``explain(model, images, methods=..., layers=...)`` yields one ``Explanation`` per input in input order: the class
explained (the top-1, or ``target``), its score, and a map per column scaled to [0, 1]. A column is a CAM method
at its target layer (default: the model's last feature stage, timm's ``feature_info[-1]``: ``layer4`` in ResNets,
``bn2`` in EfficientNet-builder models, ``stages.3`` in ConvNeXt), or ``ema <layer>``: the spatial gate an EMA layer
multiplies its input by, averaged over its groups (default: the first EMA layer of each feature stage, fine to
coarse; ``all`` for every one). Where an
EMA layer's gates are uniform, as in a warm start before fine-tuning (every gate sigmoid(0)), its map is None and
``notes`` says why: a flat picture would show nothing (likewise a CAM with no positive evidence). Images are resized whole to the model's input size (not
center-cropped), so every map covers the whole image. Unreadable inputs come out as an ``Explanation`` with
``error`` set, as ``ema-classify`` reports them.
"""
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import MissingDependencyError, UsageError
from .layers import EMA

__all__ = ['CAM_METHODS', 'METHODS', 'Explanation', 'explain', 'columns', 'default_cam_layer', 'resolve_target']

EXPLAIN_EXTRA = "pip install 'ema-hub[explain]'"
# pytorch-grad-cam's methods that fit a CNN classifier, by the name the CLI takes.
CAM_METHODS = {
    'gradcam': 'GradCAM', 'gradcam++': 'GradCAMPlusPlus', 'hirescam': 'HiResCAM', 'xgradcam': 'XGradCAM',
    'layercam': 'LayerCAM', 'eigencam': 'EigenCAM', 'eigengradcam': 'EigenGradCAM', 'scorecam': 'ScoreCAM',
    'ablationcam': 'AblationCAM', 'fullgrad': 'FullGrad',
}
METHODS = (*CAM_METHODS, 'ema')
_UNIFORM = 1e-6  # a gate map whose range is below this shows nothing


@dataclass
class Explanation:
    """One input's maps: ``maps[column]`` (H, W) float32 in [0, 1] in the image's pixel grid, or None (``notes``)."""
    path: str
    index: int = -1
    label: str = ''
    score: float = 0.0
    maps: Dict[str, Optional[np.ndarray]] = field(default_factory=dict)
    notes: Dict[str, str] = field(default_factory=dict)
    image: Optional[Image.Image] = None  # the input as decoded (upright RGB), for overlays
    error: Optional[str] = None


def _cam_classes():
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise MissingDependencyError(f'the CAM methods need the grad-cam package; install it with {EXPLAIN_EXTRA}') \
            from None
    return pytorch_grad_cam, ClassifierOutputTarget


def default_cam_layer(model: nn.Module) -> str:
    """The CAM methods' default target layer: the module of the model's last feature stage (timm's feature_info)."""
    info = getattr(model, 'feature_info', None)
    name = info[-1].get('module') if info else None
    if not name:
        raise UsageError(f'{type(model).__name__} names no feature stages; give the CAM methods a layer with --layer')
    return name


def resolve_target(model: nn.Module, target: Union[int, str, None]) -> Optional[int]:
    """The class index ``target`` names: an index, or a label name or description as the model's cfg gives them."""
    from .pretrained import class_labels, label_names

    if target is None:
        return None
    classes = getattr(model, 'num_classes', 0)
    text = str(target).strip()
    if text.lstrip('-').isdigit():
        index = int(text)
        if not 0 <= index < classes:
            raise UsageError(f'target class {index} is out of range: the model has {classes} classes (0 to '
                             f'{classes - 1})')
        return index
    for names in (label_names(model), class_labels(model)):
        lowered = [n.lower() for n in names or ()]
        if text.lower() in lowered:
            return lowered.index(text.lower())
    known = label_names(model)
    hint = f'e.g. {", ".join(known[:3])}' if known else 'this model has no class names: give an index'
    raise UsageError(f'target class {text!r} is not one of the model\'s {classes} classes ({hint})')


def _split_layers(model: nn.Module, layers: Sequence[str], methods: Sequence[str]) -> Tuple[str, List[str]]:
    """(the CAM target layer, the EMA layers drawn) from ``layers``: an EMA layer's name (or ``all``) picks the
    gates ``ema`` draws, any other module is the CAM methods' target layer."""
    ema_names = [name for name, m in model.named_modules() if isinstance(m, EMA)]
    cam_layer, gates = None, []
    for name in layers:
        if name == 'all':
            gates += ema_names
        elif name in ema_names:
            gates.append(name)
        else:
            try:
                model.get_submodule(name)
            except AttributeError:
                hint = f'EMA layers: {ema_names[0]} ... {ema_names[-1]}, or all' if ema_names else 'no EMA layers'
                raise UsageError(f'{name!r} is not a layer of the model; name a module (the CAM target, e.g. '
                                 f'{_safe_default(model)}) or an EMA layer ({hint})') from None
            if cam_layer is not None:
                raise UsageError(f'two CAM target layers given ({cam_layer}, {name}); give one')
            cam_layer = name
    if 'ema' in methods:
        if not ema_names:
            raise UsageError('the model has no EMA layer to draw; use a CAM method (--method gradcam)')
        gates = list(dict.fromkeys(gates)) or _first_of_each_stage(model, ema_names)
    else:
        gates = []
    if any(m in CAM_METHODS for m in methods):
        cam_layer = cam_layer or default_cam_layer(model)
    return cam_layer, gates


def _first_of_each_stage(model: nn.Module, ema_names: List[str]) -> List[str]:
    """The default gates: each feature stage's first EMA layer (timm's feature_info), fine to coarse; every EMA
    layer in a model that names no stages."""
    stages = [i.get('module', '') for i in getattr(model, 'feature_info', None) or ()]
    firsts = [next((n for n in ema_names if n.startswith(f'{stage}.')), None) for stage in stages if stage]
    return [n for n in dict.fromkeys(firsts) if n] or ema_names


def _safe_default(model: nn.Module) -> str:
    try:
        return default_cam_layer(model)
    except UsageError:
        return 'layer4'


def _methods(methods: Union[str, Sequence[str]]) -> List[str]:
    names = [m.strip().lower() for m in (methods.split(',') if isinstance(methods, str) else methods) if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UsageError(f'unknown method {", ".join(unknown) or "(none)"}; use one or more of {", ".join(METHODS)}')
    return list(dict.fromkeys(names))


def columns(model: nn.Module, methods: Union[str, Sequence[str]] = 'gradcam', layers: Sequence[str] = ()) -> List[str]:
    """The names of the maps ``explain`` draws with these arguments, in order: ``<method> <layer>``, ``ema <layer>``."""
    methods = _methods(methods)
    return _column_names(methods, *_split_layers(model, list(layers), methods))


def _column_names(methods: List[str], cam_layer: Optional[str], gates: List[str]) -> List[str]:
    return [f'{m} {cam_layer}' for m in methods if m in CAM_METHODS] + [f'ema {g}' for g in gates]


class _Mapper:
    """Computes a batch's logits and maps (N, columns, h, w), NaN where a gate map is uniform."""

    def __init__(self, model: nn.Module, methods: List[str], cam_layer: Optional[str], gates: List[str],
                 target: Optional[int]):
        self.model, self.methods, self.gates, self.target = model, methods, gates, target
        cams = [m for m in methods if m in CAM_METHODS]
        self.cams = {}
        if cams:
            library, self._target_class = _cam_classes()
            layer = model.get_submodule(cam_layer)
            self.cams = {m: getattr(library, CAM_METHODS[m])(model=model, target_layers=[layer]) for m in cams}
        self.columns = _column_names(methods, cam_layer, gates)

    def __call__(self, model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, maps = None, []
        maps_ema = []
        if self.gates:
            logits, maps_ema = self._gates(x)
        if self.cams:  # gradients reach the layers through x: the weights' own gradients are never computed
            x = x.detach().requires_grad_()
        for method, cam in self.cams.items():
            targets = None if self.target is None else [self._target_class(self.target)] * x.shape[0]
            maps.append(_flat_as_nan(torch.from_numpy(cam(input_tensor=x, targets=targets))))
            if logits is None:
                logits = cam.outputs.detach()
        return logits, torch.stack(maps + maps_ema, 1)

    def _gates(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        inputs = {}
        hooks = [self.model.get_submodule(g).register_forward_pre_hook(
            lambda m, args, g=g: inputs.__setitem__(g, args[0])) for g in self.gates]
        try:
            with torch.no_grad():
                logits = self.model(x)
        finally:
            for hook in hooks:
                hook.remove()
        maps = []
        for g in self.gates:
            gate = self.model.get_submodule(g).spatial_gate(inputs[g]).mean(1, keepdim=True)
            gate = nn.functional.interpolate(gate, size=x.shape[2:], mode='bilinear', align_corners=False)[:, 0]
            low, high = gate.amin((1, 2), keepdim=True), gate.amax((1, 2), keepdim=True)
            maps.append(_flat_as_nan((gate - low) / (high - low).clamp_min(_UNIFORM)))
        return logits, maps

    def close(self) -> None:
        for cam in self.cams.values():
            cam.activations_and_grads.release()


def _flat_as_nan(maps: torch.Tensor) -> torch.Tensor:
    """(N, h, w) maps scaled to [0, 1], with the flat ones (nothing to show) made NaN."""
    flat = (maps.amax((1, 2)) - maps.amin((1, 2))) <= _UNIFORM
    return torch.where(flat[:, None, None], torch.full_like(maps, float('nan')), maps)


def _in_image_grid(heat: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """A map of the squashed input resized to the image's own (W, H), bilinear, kept in [0, 1]."""
    resized = Image.fromarray(heat.astype(np.float32), mode='F').resize(size, Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def explain(model: nn.Module, images: Sequence[Union[str, object]], methods: Union[str, Sequence[str]] = 'gradcam',
            layers: Sequence[str] = (), target: Union[int, str, None] = None, *, batch_size: Optional[int] = None,
            device: Optional[torch.device] = None, progress=None, keep_images: bool = True) -> Iterator[Explanation]:
    """One ``Explanation`` per image (paths, or ``InputEntry``s as ``ema_hub.engine.images.list_inputs`` gives
    them), in input order. ``methods``: names of ``METHODS`` (a list or comma-separated); ``layers``: the CAM
    target layer and/or EMA layers (``all``); ``target``: the class to explain (index or name), else each image's
    top-1. ``keep_images``: each Explanation carries its decoded image (for overlays)."""
    from .engine.images import InputEntry, list_inputs, load_image
    from .engine.inference import run_model
    from .pretrained import class_labels

    methods = _methods(methods)
    entries = list(images) if all(isinstance(e, InputEntry) for e in images) else list_inputs(map(str, images))
    model.eval()
    cam_layer, gates = _split_layers(model, list(layers), methods)
    index = resolve_target(model, target)
    labels = class_labels(model)
    mapper = _Mapper(model, methods, cam_layer, gates, index)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for batch in run_model(entries, model, mapper, batch_size=batch_size, device=device, progress=progress,
                               grad=bool(mapper.cams), squash=True):
            for entry, row, error in batch:
                if row is None:
                    yield Explanation(entry.path, error=error)
                    continue
                yield _explanation(entry.path, row, mapper.columns, index, labels, load_image(entry.path),
                                   keep_images)
    finally:
        mapper.close()
        for p in frozen:
            p.requires_grad_(True)


def _explanation(path: str, row, columns: List[str], index: Optional[int], labels: Optional[List[str]],
                 image: Image.Image, keep_image: bool) -> Explanation:
    logits, maps = row
    probs = logits.softmax(-1)
    chosen = int(probs.argmax()) if index is None else index
    result = Explanation(path, chosen, labels[chosen] if labels else str(chosen), float(probs[chosen]),
                         image=image if keep_image else None)
    for column, heat in zip(columns, maps.numpy()):
        if np.isnan(heat).any():
            result.maps[column] = None
            result.notes[column] = (
                'uniform: every gate of this EMA layer is the same (sigmoid(0) in a warm start before fine-tuning), '
                'so it shows nothing yet' if column.startswith('ema ') else
                'empty: no positive evidence for this class at this layer (the map is zero everywhere)')
        else:
            result.maps[column] = _in_image_grid(heat, image.size)
    return result

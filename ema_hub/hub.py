"""Models and weights on the Hugging Face Hub: download, save and publish them; the public API of the modules
behind it (``loading``: create and load, ``lookup``: spec checks and the Hub's errors, ``checkpoints``: read and
convert weights files, ``catalog``: listings), re-exported here.

Model specs, everywhere (library and CLI): a variant (``resnet50_ema``, its default tag), ``variant.tag``,
``hf-hub:<repo_id>`` (a published checkpoint in timm's Hub layout) or ``local-dir:<folder>`` (the same layout
on disk). Loading is timm's own (``timm.create_model``); downloads go through huggingface_hub, so its cache,
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply.
"""
import json
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Union

import timm
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from torch import nn

from . import pretrained
from .cards import render_card, render_grafted_card
from .catalog import describe, list_variants
from .checkpoints import convert_checkpoint, read_checkpoint
from .files import follow_umask
from .loading import create_model, load_weights
from .lookup import WEIGHTS_FILE, hub_errors, is_cached, pretrained_tags, resolve_model, weights_location
from .models.grafted import ARCHITECTURE as GRAFTED
from .pretrained import class_labels, label_names
from .specs import HF_HUB, PathLike, parse_spec

__all__ = [
    'create_model', 'resolve_model', 'pretrained_tags', 'weights_location', 'is_cached', 'download', 'load_weights',
    'read_checkpoint', 'save_pretrained', 'publish', 'convert_checkpoint', 'class_labels', 'label_names',
    'list_variants', 'describe',
]

# Files a published checkpoint consists of (timm's Hub layout plus its card).
_CHECKPOINT_FILES = ['config.json', WEIGHTS_FILE, 'README.md']


def download(model: str, to: Optional[PathLike] = None, force: bool = False) -> Path:
    """Prefetch a model's weights: into the Hugging Face cache (the default), or as a loadable folder.

    With ``to``, the folder holds the model in timm's Hub layout (config.json, model.safetensors, README.md):
    warm tags are mapped first, so ``timm.create_model('local-dir:<to>')`` gives the tag's model offline.
    """
    spec = parse_spec(resolve_model(model))
    if to is not None:
        if spec.repo_id is not None:
            with hub_errors(model):
                return Path(snapshot_download(spec.repo_id, allow_patterns=_CHECKPOINT_FILES, local_dir=to,
                                              force_download=force))
        if force and spec.folder is None:
            download(model, force=True)
        return save_pretrained(create_model(model), to)
    repo_id, filename = weights_location(model)
    with hub_errors(model):
        if spec.repo_id is not None:
            return Path(snapshot_download(repo_id, allow_patterns=_CHECKPOINT_FILES, force_download=force))
        return Path(hf_hub_download(repo_id, filename, force_download=force))


def save_pretrained(
        model: nn.Module,
        folder: PathLike,
        repo_id: Optional[str] = None,
        metrics: Optional[Dict[str, object]] = None,
        data_config: Optional[Dict[str, object]] = None,
        label_names: Optional[List[str]] = None,
) -> Path:
    """Write ``model`` in timm's Hub layout (config.json, model.safetensors) with its model card as README.md.

    ``data_config`` (input_size, interpolation, crop_pct, mean, std) and ``label_names`` (one per class) go
    into config.json, replacing those of the model's pretrained cfg. The class names (``label_names``, else the
    model's own) go to config.json's top level, where timm reads them first and transformers' TimmWrapper
    reads them only; an ImageNet head's synsets stay in the pretrained cfg, as in timm's own checkpoints, so
    that transformers names those classes by their descriptions, as ``ema-classify`` does.
    """
    folder = Path(folder)
    names = list(label_names) if label_names is not None else pretrained.label_names(model)
    model_config = None
    if names is not None and not _imagenet_synsets(names):
        model_config = {'label_names': names}
    timm.models.save_for_hf(
        model, folder, model_config=model_config, safe_serialization=True, data_config=data_config)
    follow_umask(folder / WEIGHTS_FILE)  # safetensors writes it 0600: unreadable to others once published
    _without_duplicate_num_classes(folder / 'config.json')
    variant = model.pretrained_cfg['architecture']
    if variant == GRAFTED:
        card = render_grafted_card(model._model_args['base'], repo_id=repo_id, metrics=metrics and dict(
            metrics, num_classes=model.num_classes))
    elif metrics:
        card = render_card(variant, repo_id=repo_id, weights='trained', metrics=dict(
            metrics, num_classes=model.num_classes))
    else:
        card = render_card(variant, repo_id=repo_id)
    (folder / 'README.md').write_text(card, encoding='utf-8')
    return folder


def _imagenet_synsets(names: List[str]) -> bool:
    """Whether ``names`` are the synsets of the ImageNet subset with that many classes (timm's tables)."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({'num_classes': len(names)})
    return bool(subset) and ImageNetInfo(subset).label_names() == names


def _without_duplicate_num_classes(config: Path) -> None:
    """Drop ``num_classes`` from config.json's ``model_args``: transformers' TimmWrapper passes the class count
    itself and then ``model_args`` as keywords, so the folder loaded in neither its pipeline nor AutoModel.
    timm reads the count from the top level, where it stays."""
    data = json.loads(config.read_text(encoding='utf-8'))
    if isinstance(data.get('model_args'), dict) and data['model_args'].pop('num_classes', None) is not None:
        config.write_text(json.dumps(data, indent=2) + '\n', encoding='utf-8')


def publish(
        model: Union[str, nn.Module],
        repo_id: str,
        *,
        dry_run_dir: Optional[PathLike] = None,
        token: Optional[str] = None,
        private: bool = False,
        metrics: Optional[Dict[str, object]] = None,
) -> str:
    """Publish a model (a spec or a module) to ``repo_id`` in timm's Hub layout; with ``dry_run_dir``, stop at the folder.

    A ``local-dir:`` folder that already holds a card (a fine-tuning result, say) is published as it is, so its
    card keeps the accuracy measured there. Returns the folder path for a dry run, else the URL of the commit.
    """
    if dry_run_dir is not None:
        return str(_publishable_folder(model, Path(dry_run_dir), repo_id, metrics))
    with tempfile.TemporaryDirectory() as tmp, hub_errors(f'{HF_HUB}{repo_id}'):
        _publishable_folder(model, Path(tmp), repo_id, metrics)
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True, private=private)
        commit = api.upload_folder(folder_path=tmp, repo_id=repo_id, commit_message='Upload ema-hub checkpoint')
        return str(getattr(commit, 'commit_url', commit))


def _publishable_folder(model: Union[str, nn.Module], folder: Path, repo_id: str, metrics) -> Path:
    """Write what publish uploads into ``folder``: a card-carrying local-dir as it is, else save_pretrained's layout."""
    source = parse_spec(model).folder if isinstance(model, str) else None
    if source is not None and metrics is None:
        if (source / 'README.md').is_file():
            create_model(model)  # check that it loads before publishing it
            folder.mkdir(parents=True, exist_ok=True)
            for name in _CHECKPOINT_FILES + ['metrics.json']:
                if (source / name).is_file() and (source / name).resolve() != (folder / name).resolve():
                    shutil.copyfile(source / name, folder / name)
            return folder
    net = create_model(model) if isinstance(model, str) else model
    return save_pretrained(net, folder, repo_id=repo_id, metrics=metrics)

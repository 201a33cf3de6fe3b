"""Model specs, as users write them everywhere (library and CLI), parsed in one place.

A spec is a timm model name (``resnet50_ema``: its default tag), ``name.tag``, ``hf-hub:<repo_id>`` (a
checkpoint in timm's Hub layout on the Hub) or ``local-dir:<folder>`` (the same layout on disk): the forms
``timm.create_model`` takes.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

__all__ = ['PathLike', 'HF_HUB', 'LOCAL_DIR', 'CHECKPOINT_SOURCES', 'ModelSpec', 'parse_spec']

# What a path argument may be, everywhere in the package.
PathLike = Union[str, os.PathLike]

# timm's names for the two checkpoint sources (a pretrained cfg's ``source``); a spec is one, a colon, the place.
CHECKPOINT_SOURCES = ('hf-hub', 'local-dir')
HF_HUB, LOCAL_DIR = (f'{source}:' for source in CHECKPOINT_SOURCES)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``name`` and ``tag`` for a model name, ``repo_id`` or ``folder`` for a checkpoint."""
    text: str                       # as given
    name: str = ''                  # 'resnet50_ema' (empty for hf-hub:/local-dir:)
    tag: str = ''                   # 'warm_a1_in1k', or '' for the default tag
    repo_id: Optional[str] = None   # hf-hub:<repo_id>
    folder: Optional[Path] = None   # local-dir:<folder>

    @property
    def is_checkpoint(self) -> bool:
        """Whether the spec names a checkpoint (hf-hub:, local-dir:), whose weights load even without pretrained=True."""
        return self.repo_id is not None or self.folder is not None

    def __str__(self) -> str:
        return self.text


def parse_spec(spec: Union[str, ModelSpec]) -> ModelSpec:
    """Split a spec into its parts; nothing is looked up (``ema_hub.hub.resolve_model`` checks names and tags)."""
    if isinstance(spec, ModelSpec):
        return spec
    if spec.startswith(HF_HUB):
        return ModelSpec(spec, repo_id=spec[len(HF_HUB):])
    if spec.startswith(LOCAL_DIR):
        return ModelSpec(spec, folder=Path(spec[len(LOCAL_DIR):]))
    name, _, tag = spec.partition('.')
    return ModelSpec(spec, name=name, tag=tag)

"""torchrun on CPU (gloo): the multi-process helpers (ema_hub/engine/distributed.py), and features gathered on rank 0
(ema_hub/engine/features.py: ``gather_features`` and ``ema-hub features``), every input once, in input order."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ema_hub.engine import distributed
from ema_hub.engine.output import read_features
from support.cli import ROOT

SCRIPT = r'''
import json, sys
import numpy as np
from ema_hub.engine import distributed, features, inference
from ema_hub.engine.images import list_inputs

folder, weights, out = sys.argv[1:4]
info = distributed.init('cpu')
model = inference.load_model('resnet18_ema', weights=weights, device=info.device)
entries = list_inputs([folder])
paths, feats, errors = [], [], []
for batch in features.gather_features(entries, model, batch_size=4, workers=0, round_size=5):
    paths += batch.paths
    feats.append(batch.features)
    errors += [p for p, _ in batch.errors]
if distributed.is_main():
    np.savez(out, features=np.concatenate(feats), paths=np.array(paths))
    with open(out + '.json', 'w') as f:
        json.dump({'errors': errors, 'world': info.world_size}, f)
else:
    assert not paths and not feats, 'only rank 0 receives rows'
distributed.cleanup()
'''


def test_shard_indices_cover_every_index_once():
    for n in (0, 1, 5, 17):
        for world in (1, 2, 3, 8):
            shards = [distributed.shard_indices(n, r, world) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n))


def test_single_process_helpers_are_no_ops():
    info = distributed.init('cpu')
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert distributed.is_main() and distributed.world_size() == 1
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_sum(t), t)
    assert distributed.all_gather_objects({'a': 1}) == [{'a': 1}]
    distributed.barrier()


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """23 small images (odd, so the shards differ in size) and one unreadable file, in nested folders."""
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for i in range(23):
        path = root / f'group{i % 3}' / f'img{i:02d}.png'
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(path)
    (root / 'group1' / 'img99.png').write_bytes(b'not an image')
    return root


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory):
    import safetensors.torch
    import timm
    import ema_hub  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model('resnet18_ema', pretrained=False, num_classes=10)
    path = tmp_path_factory.mktemp('w') / 'model.safetensors'
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path


def _run(folder, weights, out, nproc):
    script = out.parent / 'features_script.py'
    script.write_text(SCRIPT)
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', str(nproc)]
    proc = subprocess.run(launcher + [str(script), str(folder), str(weights), str(out)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-4000:]
    features, paths, _ = read_features(out)
    return features, paths, json.loads(Path(str(out) + '.json').read_text())


def test_torchrun_features_gathered_once_in_input_order(image_folder, weights_file, tmp_path):
    single, single_paths, single_meta = _run(image_folder, weights_file, tmp_path / 'one.npz', 1)
    multi, multi_paths, multi_meta = _run(image_folder, weights_file, tmp_path / 'two.npz', 2)
    assert multi_meta['world'] == 2 and single_meta['world'] == 1
    assert len(single_paths) == 23 and len(set(multi_paths)) == len(multi_paths)
    assert multi_paths == single_paths  # every readable input exactly once, in input order
    assert multi_meta['errors'] == single_meta['errors'] == [str(image_folder / 'group1' / 'img99.png')]
    np.testing.assert_allclose(multi, single, rtol=1e-4, atol=1e-5)


def test_torchrun_features_cli_matches_single_process(image_folder, weights_file, tmp_path):
    def run(nproc, out):
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', str(nproc)]
        proc = subprocess.run(launcher + ['-m', 'ema_hub_cli.app', 'features', str(image_folder), '--model',
                                          'resnet18_ema', '--weights', str(weights_file), '--output', str(out),
                                          '--device', 'cpu', '--workers', '0'],
                              capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env={**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'})
        assert proc.returncode == 1, proc.stderr[-3000:]  # the unreadable file is reported: exit 1
        assert proc.stderr.count('img99.png') == 1
        return read_features(out)

    one_features, one_paths, _ = run(1, tmp_path / 'one.npz')
    two_features, two_paths, _ = run(2, tmp_path / 'two.npz')
    assert two_paths == one_paths and len(one_paths) == 23
    np.testing.assert_allclose(two_features, one_features, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['one.npz', 'two.npz']

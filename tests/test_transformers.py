"""Folders ema-hub writes (publish --dry-run, finetune; so also published repos) load in transformers'
image-classification pipeline after ``import ema_hub``, with the class names, and rank classes as ema-classify
does on the same image."""
import json

import pytest

from support.cli import run

transformers = pytest.importorskip('transformers')  # the dev extra installs it; a plain install need not


def _pipeline_top(folder, image, k):
    import ema_hub  # noqa: F401  (registers the variants with timm, which transformers' TimmWrapper builds)

    classify = transformers.pipeline('image-classification', model=str(folder), device='cpu')
    return classify(str(image), top_k=k)


def _ema_classify_top(folder, image, k):
    proc = run('ema-classify', str(image), '--model', f'local-dir:{folder}', '-k', str(k), '--format', 'jsonl')
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)['predictions']


def _assert_same_ranking(pipeline_top, cli_top):
    assert [p['label'] for p in pipeline_top] == [p['label'] for p in cli_top]
    for a, b in zip(pipeline_top, cli_top):
        assert abs(a['score'] - b['score']) < 1e-5


def test_published_folder_in_the_pipeline(checkpoint, inputs, tmp_path):
    folder = tmp_path / 'published'
    proc = run('ema-hub', 'publish', f'local-dir:{checkpoint}', 'someone/resnet18-ema', '--dry-run', str(folder))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((folder / 'config.json').read_text())
    assert 'num_classes' not in config.get('model_args', {}) and config['num_classes'] == 5
    image = inputs['nonsquare.JPG']  # small: ema-classify decodes it at full size, as the pipeline does
    top = _pipeline_top(folder, image, 3)
    assert {p['label'] for p in top} <= {'ant', 'bee', 'cat', 'dog', 'eel'}
    _assert_same_ranking(top, _ema_classify_top(folder, image, 3))


def test_finetuned_folder_in_the_pipeline(trained, digits):
    folder = trained[0]
    image = sorted((digits / 'val' / '3').glob('*.png'))[0]
    top = _pipeline_top(folder, image, 5)
    assert all(p['label'] in [str(d) for d in range(10)] for p in top)
    _assert_same_ranking(top, _ema_classify_top(folder, image, 5))


def test_imagenet_head_named_as_ema_classify_names_it(tmp_path):
    """An ImageNet head's synsets stay in the pretrained cfg (as in timm's own checkpoints): transformers then
    names the classes by their descriptions, the names ema-classify prints; timm still reads the synsets."""
    import timm

    import ema_hub  # noqa: F401  (registers the variants)
    from ema_hub.hub import class_labels, create_model, label_names, save_pretrained

    model = timm.create_model('resnet18_ema', pretrained=False)
    assert label_names(model) is not None and len(label_names(model)) == 1000
    save_pretrained(model, tmp_path / 'in1k')
    config = transformers.AutoConfig.from_pretrained(str(tmp_path / 'in1k'))
    assert [config.id2label[i] for i in range(1000)] == class_labels(model)
    reloaded = create_model(f'local-dir:{tmp_path / "in1k"}')
    assert label_names(reloaded) == label_names(model) and class_labels(reloaded) == class_labels(model)

"""The quick Fashion-MNIST preset end to end on the real files (what quickstart.sh runs):
train a few steps, restore the checkpoint, --test_eval twice on all 10000 test images,
sample.py, and valid PNGs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def real_fmnist(tmp_path_factory):
    """DATA_ROOT with the real Fashion-MNIST, made by setup_fashion_mnist.sh itself."""
    root = tmp_path_factory.mktemp('real_fm')
    p = subprocess.run(['bash', os.path.join(ROOT, 'setup_fashion_mnist.sh'), str(root)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        if os.environ.get('CI'):
            raise AssertionError(p.stdout + p.stderr)
        pytest.skip(f'Fashion-MNIST not available here: {p.stderr.strip()[-200:]}')
    return str(root)


def run(*args):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


def test_quick_preset_end_to_end(real_fmnist, tmp_path):
    common = ['--hps', 'fashion_mnist_quick', '--data_root', real_fmnist, '--save_dir', str(tmp_path),
              '--desc', 'quick', '--no_progress', '--threads', '1']
    out = run('train.py', *common, '--max_iters', '3', '--valid_images', '500', '--iters_per_images', '2')
    assert 'finished at step 3' in out
    rd = tmp_path / 'quick'
    first = run('train.py', *common, '--test_eval')
    second = run('train.py', *common, '--test_eval')
    line = [x for x in first.splitlines() if x.startswith('test elbo over')]
    assert line and line[0].startswith('test elbo over 10000 images')
    assert line[0] in second.splitlines()  # the same checkpoint gives the same number
    tests = [json.loads(x) for x in open(rd / 'log.jsonl') if '"test_loss"' in x]
    assert len(tests) == 2 and tests[0]['elbo'] == tests[1]['elbo'] and 0 < tests[0]['elbo_bpd'] < 9
    # the sample grid: originals, num_variables_visualize reconstructions, num_temperatures samples
    from hps import get_hparams
    H = get_hparams(['--hps', 'fashion_mnist_quick'])
    rows = 1 + H.num_variables_visualize + H.num_temperatures_visualize
    for name in ['samples-1.png', 'samples-2.png', 'samples-3.png']:
        im = Image.open(rd / name)
        im.load()
        assert im.size == (28 * H.num_images_visualize, 28 * rows) and im.mode == 'L'
    # the TensorBoard events quickstart.sh leaves, read by TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(rd / 'tensorboard'))
    acc.Reload()
    windows = [z for z in map(json.loads, open(rd / 'log.jsonl')) if z.get('type') == 'train_loss' and 'lr' in z]
    assert [(e.step, e.value) for e in acc.Scalars('train/elbo_bpd')] == \
        [(z['step'] + 1, np.float32(z['elbo_bpd'])) for z in windows]
    assert [e.step for e in acc.Images('samples')] == [1, 2, 3]
    assert [(e.step, e.value) for e in acc.Scalars('test/elbo')] == [(3, np.float32(tests[0]['elbo']))] * 2
    plot = Image.open(rd / 'loss.png')
    plot.load()
    assert plot.size[0] >= 300 and plot.size[1] >= 200
    # the first row of the grid is the first valid images, unchanged
    import data
    H.data_root = real_fmnist
    valid = data.load_data(H).valid
    grid = np.asarray(Image.open(rd / 'samples-3.png'))
    first_row = np.concatenate(list(valid[np.arange(H.num_images_visualize)][..., 0]), axis=1)
    np.testing.assert_array_equal(grid[:28], first_row)
    out = run('sample.py', '--hps', 'fashion_mnist_quick', '--save_dir', str(tmp_path), '--desc', 'quick',
              '--mode', 'uncond', '--n', '5', '--temperatures', '1.0,0.8')
    assert Image.open(rd / 'uncond.png').size == (5 * 28, 2 * 28)

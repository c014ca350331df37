"""sample.py on a tiny trained run: grids, unconditional samples, reconstructions, errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_train import TINY, fmnist_root, run as run_train  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny_run(fmnist_root, tmp_path_factory):
    save = tmp_path_factory.mktemp('runs')
    run_train(TINY + ['--data_root', fmnist_root, '--save_dir', str(save), '--desc', 'r', '--max_iters', '2',
                      '--n_batch', '4'])
    return fmnist_root, str(save)


def sample(*args, check=True):
    p = subprocess.run([sys.executable, 'sample.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_uncond_grid_and_recon(tiny_run, tmp_path):
    root, save = tiny_run
    # the run's own config decides the architecture: plain --hps fashion_mnist is enough
    base = ['--hps', 'fashion_mnist', '--data_root', root, '--save_dir', save, '--desc', 'r']
    sample(*base, '--mode', 'uncond', '--n', '3', '--temperatures', '1.0,0.5', '--out', str(tmp_path / 'u.png'))
    assert Image.open(tmp_path / 'u.png').size == (3 * 28, 2 * 28)
    sample(*base, '--mode', 'grid', '--out', str(tmp_path / 'g.png'))
    assert Image.open(tmp_path / 'g.png').size == (8 * 28, (1 + 6 + 3) * 28)
    img = np.random.RandomState(0).randint(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / 'in.png')
    sample(*base, '--mode', 'recon', '--images', str(tmp_path / 'in.png'), '--indices', '0,1', '--k', '0,4',
           '--out', str(tmp_path / 'r.png'))
    r = np.asarray(Image.open(tmp_path / 'r.png'))
    assert r.shape == (3 * 28, 3 * 28)
    np.testing.assert_array_equal(r[:28, :28], img)  # first row: the originals


def test_one_reconstruction_rule_for_the_grid_sample_and_evaluate(tiny_run, tmp_path):
    """The training grid's reconstruction rows, sample.py --mode recon and evaluate.py
    --reconstruct draw the same pictures of the same images and k (pictures.reconstruct:
    keyed posterior noise, the rest from the prior at 0.1, seeded per picture)."""
    import evaluate
    import sample as sample_py
    root, save = tiny_run
    run = ['--data_root', root, '--save_dir', save, '--desc', 'r', '--threads', '1']
    sample_py.main(run + ['--mode', 'recon', '--split', 'valid', '--indices', '0,1', '--k', '1,3',
                          '--out', str(tmp_path / 's.png')])  # in this process: no start-up of its own
    evaluate.main(run + ['--reconstruct', '--split', 'valid', '--indices', '0', '1', '--keep', '1', '3',
                         '--out_dir', str(tmp_path / 'e'), '--no_progress'])
    s = np.asarray(Image.open(tmp_path / 's.png'))
    e = np.asarray(Image.open(tmp_path / 'e' / 'reconstructions.png'))
    assert s.shape == e.shape == (3 * 28, 2 * 28)
    np.testing.assert_array_equal(s, e)
    # the grid after the last step (4 blocks, 6 rows: k = 0, 1, 1, 2, 2, 3), its first two columns
    grid = np.asarray(Image.open(os.path.join(save, 'r', 'samples-2.png')))
    np.testing.assert_array_equal(grid[2 * 28:3 * 28, :2 * 28], s[28:2 * 28])  # k = 1
    np.testing.assert_array_equal(grid[6 * 28:7 * 28, :2 * 28], s[2 * 28:])  # k = 3
    sample_py.main(run + ['--mode', 'grid', '--split', 'valid', '--out', str(tmp_path / 'g.png')])  # the grid again
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'g.png')), grid)


def test_same_seed_same_samples(tiny_run, tmp_path):
    root, save = tiny_run
    base = ['--hps', 'fashion_mnist', '--save_dir', save, '--desc', 'r', '--mode', 'uncond', '--n', '4']
    sample(*base, '--out', str(tmp_path / 'a.png'))
    sample(*base, '--out', str(tmp_path / 'b.png'))
    sample(*base, '--seed', '1', '--out', str(tmp_path / 'c.png'))
    a, b, c = (np.asarray(Image.open(tmp_path / f'{n}.png')) for n in 'abc')
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize('args,expect', [
    (['--mode', 'recon'], 'needs --images'),
    (['--mode', 'recon', '--indices', '0', '--k', '99'], 'k must be in 0..4'),
    (['--mode', 'recon', '--images', '/nonexistent.png'], 'does not exist'),
    (['--mode', 'uncond', '--temperatures', 'hot'], 'expected numbers separated by spaces or commas'),
    (['--desc', 'no_such_run'], 'no weights'),
])
def test_bad_arguments(tiny_run, args, expect):
    root, save = tiny_run
    p = sample('--hps', 'fashion_mnist', '--data_root', root, '--save_dir', save, '--desc', 'r', *args, check=False)
    assert p.returncode == 2 and expect in p.stderr and 'Traceback' not in p.stderr


def test_many_uncond_samples_wrap_into_a_near_square_block():
    """--mode uncond --n 3000 makes, per temperature, a block of rows of 55 images (the last
    one filled with black), not one row 84000 pixels wide; up to 16 stay one row each."""
    from sample import unconditional

    class Model:
        def forward_uncond_samples(self, n, t=None):
            return np.full((n, 28, 28, 1), int(t * 100), np.uint8)

    im = unconditional(None, Model(), 3000, [1.0, 0.5])
    assert im.shape == (2 * 55 * 28, 55 * 28, 1)  # 3000 = 54 rows of 55 + 30
    first, second = im[:55 * 28], im[55 * 28:]
    assert (first[:54 * 28] == 100).all() and (second[:54 * 28] == 50).all()
    assert (first[54 * 28:, :30 * 28] == 100).all() and (first[54 * 28:, 30 * 28:] == 0).all()
    assert unconditional(None, Model(), 16, [1.0, 0.9, 0.8]).shape == (3 * 28, 16 * 28, 1)

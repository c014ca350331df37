"""evaluate.py on a tiny Fashion-MNIST model trained here for a few seconds: the
importance-weighted bound (K=1 is the ELBO of the same samples, K=64 is tighter),
per-layer KL statistics, latent export and its round trip, picture grids, the run-folder
and distributed paths, and the errors bad arguments give."""
import gzip
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import evaluation
import checkpoints
from hps import UserError, preset
from vae import VAE
from vae_helpers import KeyedNormal, gaussian_log_density

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = '/usr/share/datasets/fashion-mnist'
ARCH = dict(width=16, zdim=2, num_mixtures=2, enc_blocks='28x1,28d2,14x1,14d2,7x1,7d7,1x1',
            dec_blocks='1x1,7m1,14m7,28m14')  # 4 decoder blocks at resolutions 1, 7, 14, 28
N_BLOCKS, NDIMS = 4, 28 * 28
N_TEST = 64


def _read_idx(path):
    raw = gzip.open(path).read()
    n = struct.unpack('>4i', raw[:16])[1]
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 28, 28)


def _write_idx(path, images):
    with gzip.open(path, 'wb', compresslevel=1) as f:
        f.write(struct.pack('>4i', 0x803, len(images), 28, 28))
        f.write(images.tobytes())


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's convolutions run fastest on one thread (and the machine is shared)."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope='session')
def fm_root(tmp_path_factory):
    """A small fashion_mnist data root: 5100 real training images (the split holds out
    5000) and the first N_TEST real test images, so loading takes milliseconds."""
    if not os.path.exists(os.path.join(FMNIST, 'train-images-idx3-ubyte.gz')):
        pytest.skip(f'Fashion-MNIST files not found in {FMNIST}')
    root = tmp_path_factory.mktemp('fm')
    os.makedirs(root / 'fashion_mnist')
    _write_idx(root / 'fashion_mnist' / 'train-images-idx3-ubyte.gz',
               _read_idx(os.path.join(FMNIST, 'train-images-idx3-ubyte.gz'))[:5100])
    _write_idx(root / 'fashion_mnist' / 't10k-images-idx3-ubyte.gz',
               _read_idx(os.path.join(FMNIST, 't10k-images-idx3-ubyte.gz'))[:N_TEST])
    return str(root)


@pytest.fixture(scope='session')
def trained(fm_root, tmp_path_factory):
    """(H, model, weights path): the tiny model after 100 Adam steps on 100 training images
    (rate ~0.07 nats/dim, so the posterior carries information)."""
    torch.set_num_threads(1)  # session fixtures run before the function-scoped thread setting
    H = preset('fashion_mnist', data_root=fm_root, **ARCH)
    x = torch.from_numpy(data.load_data(H).train[np.arange(100)])
    torch.manual_seed(0)
    model = VAE(H)
    opt = torch.optim.Adam(model.parameters(), lr=4e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        x_in, x_target = data.preprocess(H, x[torch.randint(0, len(x), (16,), generator=g)])
        loss = model(x_in, x_target)['elbo']
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 200.)
        opt.step()
    model.eval().requires_grad_(False)
    path = str(tmp_path_factory.mktemp('weights') / 'tiny-model-ema.th')
    torch.save(model.state_dict(), path)
    return H, model, path


@pytest.fixture
def run(trained, fm_root, tmp_path):
    """run('--kl_stats', ...) -> evaluate.main's summary; outputs in tmp_path/out."""
    def _run(*flags, weights=None):
        argv = ['--hps', 'fashion_mnist', *[f'--{k}={v}' for k, v in ARCH.items()], '--data_root', fm_root,
                '--restore_ema_path', weights or trained[2], '--out_dir', str(tmp_path / 'out'), '--threads', '1',
                '--num_workers', '0', '--no_progress', *map(str, flags)]
        return evaluate.main(argv)
    return _run


def _test_batch(H, n, start=0):
    source = data.load_data(H).test
    return data.preprocess(H, torch.from_numpy(source[np.arange(start, start + n)]))


# ----------------------------------------------------------------------------- IWAE bound

def test_k1_bound_is_the_elbo_of_the_same_samples(trained):
    H, model, _ = trained
    x_in, x_target = _test_batch(H, 8)
    torch.manual_seed(3)
    lw = evaluation.log_weights(model, model.encoder(x_in), x_target, 1)[0]
    # independently: the same noise through the model's own posterior pass
    torch.manual_seed(3)
    distortion, stats = model.forward_with_dists(x_in, x_target)
    want = -distortion.double() * NDIMS
    for s in stats:
        z = s['z'].double()
        want -= (gaussian_log_density(z, s['qm'].double(), s['qv'].double())
                 - gaussian_log_density(z, s['pm'].double(), s['pv'].double())).sum(dim=(1, 2, 3))
    np.testing.assert_allclose(lw.numpy(), want.numpy(), rtol=1e-12)
    torch.manual_seed(3)
    bound, elbo, ess = evaluation.importance_weighted_bound(model, x_in, x_target, K=1, chunk=1)
    assert torch.equal(bound, elbo) and torch.equal(bound, lw) and torch.all(ess == 1)


def test_single_sample_elbo_averages_to_the_analytic_kl_elbo(trained):
    """E[log p(x|z) + log p(z) - log q(z|x)] equals E[distortion + analytic KL]."""
    H, model, _ = trained
    x_in, x_target = _test_batch(H, 4)
    n = 200
    torch.manual_seed(0)
    mc = -evaluation.log_weights(model, model.encoder(x_in), x_target, n).numpy() / NDIMS  # (n, 4)
    torch.manual_seed(1)
    analytic = model.forward_per_image(x_in.repeat(n, 1, 1, 1), x_target.repeat(n, 1, 1, 1))['elbo']
    analytic = analytic.double().view(n, 4).numpy()
    se = np.sqrt(mc.var(0, ddof=1) / n + analytic.var(0, ddof=1) / n)
    diff = mc.mean(0) - analytic.mean(0)
    assert np.all(np.abs(diff) < 4 * se), (diff, se)
    assert np.all(se < 0.01)  # nats/dim: the comparison has teeth


def test_streamed_chunks_equal_one_logsumexp(trained):
    """K samples streamed in chunks of 3 give the bound of one pass over all K: sample k of
    an image has the same keyed noise whatever chunk it falls in."""
    H, model, _ = trained
    x_in, x_target = _test_batch(H, 3)
    K, chunk = 7, 3
    noise = KeyedNormal(H.seed, torch.arange(3))
    bound, elbo, ess = evaluation.importance_weighted_bound(model, x_in, x_target, K, chunk, noise=noise)
    lw = evaluation.log_weights(model, model.encoder(x_in), x_target, K, noise=noise.repeat(0, K))  # (K, 3)
    np.testing.assert_allclose(bound, torch.logsumexp(lw, 0) - math.log(K), rtol=1e-6)
    np.testing.assert_allclose(elbo, lw.mean(0), rtol=1e-6)
    w = torch.exp(lw - lw.max(0).values)
    np.testing.assert_allclose(ess, w.sum(0) ** 2 / (w ** 2).sum(0), rtol=1e-5)


def test_iw_bound_k64_beats_k1(run):
    one = run('--n_importance', 1, '--n_images', 16)
    many = run('--n_importance', 64, '--n_images', 16, '--iw_batch', 32)
    p1, p64 = np.load(one['per_image']), np.load(many['per_image'])
    np.testing.assert_array_equal(p1['image_index'], np.arange(16))
    # K=1: the bound is the single-sample ELBO, exactly
    np.testing.assert_array_equal(p1['iw_nll_nats_per_dim'], p1['elbo_nats_per_dim'])
    assert one['iw_nll_nats_per_dim'] == one['elbo_nats_per_dim']
    # K=64: never worse than the mean ELBO of its own 64 samples (Jensen), and on average
    # clearly better than K=1 (paired over the same images)
    assert np.all(p64['iw_nll_nats_per_dim'] <= p64['elbo_nats_per_dim'])
    gain = p1['iw_nll_nats_per_dim'] - p64['iw_nll_nats_per_dim']
    assert gain.mean() > 3 * gain.std(ddof=1) / 4, gain
    assert many['iw_nll_nats_per_dim'] < one['iw_nll_nats_per_dim']
    # reported units and standard error
    nll = p64['iw_nll_nats_per_dim']
    assert many['iw_nll_nats_per_dim'] == pytest.approx(nll.mean(), rel=1e-12)
    assert many['iw_nll_nats_per_dim_stderr'] == pytest.approx(nll.std(ddof=1) / 4, rel=1e-12)
    assert many['iw_nll_bits_per_dim'] == pytest.approx(nll.mean() / math.log(2), rel=1e-12)
    assert 0 < many['mean_ess_fraction'] <= 1 and one['mean_ess_fraction'] == 1
    assert json.load(open(many['json']))['n_importance'] == 64
    print(f"\ntiny model, 16 test images: K=1 {one['iw_nll_nats_per_dim']:.4f} +- "
          f"{one['iw_nll_nats_per_dim_stderr']:.4f}, K=64 {many['iw_nll_nats_per_dim']:.4f} +- "
          f"{many['iw_nll_nats_per_dim_stderr']:.4f} nats/dim; paired gain {gain.mean():.4f} +- "
          f"{gain.std(ddof=1) / 4:.4f}; ESS/K {many['mean_ess_fraction']:.3f}")


# ----------------------------------------------------------------------------- KL statistics

def test_kl_stats_sum_to_the_rate(run, trained):
    st = run('--kl_stats', '--n_images', 20, '--n_batch_eval', 8)
    assert st['n_images'] == 20 and [b['resolution'] for b in st['blocks']] == [1, 7, 14, 28]
    kl = np.array([b['kl_nats'] for b in st['blocks']])
    assert kl.sum() / NDIMS == pytest.approx(st['rate_nats_per_dim'], rel=1e-6)
    assert sum(r['kl_nats'] for r in st['resolutions']) == pytest.approx(kl.sum(), rel=1e-12)
    assert sum(b['share_of_rate'] for b in st['blocks']) == pytest.approx(1, rel=1e-6)
    assert st['elbo_nats_per_dim'] == pytest.approx(st['distortion_nats_per_dim'] + st['rate_nats_per_dim'],
                                                    rel=1e-6)
    assert st['inactive_blocks'] == [b['index'] for b in st['blocks'] if b['kl_nats'] < 0.01]
    assert json.load(open(st['json']))['blocks'] == st['blocks']
    with Image.open(st['png']) as im:
        assert im.format == 'PNG' and im.size[0] > 300
    # the same images through the model directly: the per-block means agree to within noise
    H, model, _ = trained
    x_in, x_target = _test_batch(H, 20)
    torch.manual_seed(0)
    direct = model.forward_per_image(x_in, x_target)['kl_per_block'].double().mean(0).numpy()
    np.testing.assert_allclose(kl, direct, rtol=0.2, atol=0.05)
    # a threshold above every block flags them all
    assert run('--kl_stats', '--n_images', 4, '--inactive_threshold', 1e6)['inactive_blocks'] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- latent export

def test_exported_latents_reproduce_the_reconstruction(run, trained):
    H, model, _ = trained
    out = run('--encode', '--encode_what', 'both', '--n_images', 12, '--n_batch_eval', 5)  # uneven batches
    with np.load(out['path']) as f:
        z = {k: f[k] for k in f.files}
    np.testing.assert_array_equal(z['block_index'], [0, 1, 2, 3])
    np.testing.assert_array_equal(z['block_resolution'], [1, 7, 14, 28])
    np.testing.assert_array_equal(z['image_index'], np.arange(12))
    assert str(z['split']) == 'test' and str(z['encode_what']) == 'both'
    for i, r in enumerate([1, 7, 14, 28]):
        for kind in ('z', 'qm', 'qlogstd'):
            assert z[f'{kind}_{i}'].shape == (12, 2, r, r) and z[f'{kind}_{i}'].dtype == np.float32
    np.testing.assert_allclose(z['kl_per_block'].sum(1) / NDIMS, z['rate'], rtol=1e-5)
    x_in, x_target = _test_batch(H, 12)
    # all z's through the prior path rebuild the posterior pass's p(x|z): same likelihood
    with torch.no_grad():
        px_z = model.decoder.forward_manual_latents(12, [torch.from_numpy(z[f'z_{i}']) for i in range(4)])
        nll = model.decoder.out_net.nll(px_z, x_target).numpy()
        np.testing.assert_allclose(nll, z['distortion'], rtol=1e-5)
        # the top block's posterior depends on x only: compare with a fresh pass
        _, stats = model.forward_with_dists(x_in, x_target)
    np.testing.assert_allclose(z['qm_0'], stats[0]['qm'].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z['qlogstd_0'], stats[0]['qv'].numpy(), rtol=1e-5, atol=1e-6)
    # and the samples are z = qm + exp(qlogstd) * N(0, 1)
    eps = np.concatenate([((z[f'z_{i}'] - z[f'qm_{i}']) / np.exp(z[f'qlogstd_{i}'])).ravel() for i in range(4)])
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    assert not os.path.exists(out['path'] + '.parts')
    # a subset of blocks, samples only
    sub = run('--encode', '--encode_what', 'sample', '--encode_blocks', '1-2', '--n_images', 3)
    with np.load(sub['path']) as f:
        assert sorted(k for k in f.files if k[0] in 'zq') == ['z_1', 'z_2']
        np.testing.assert_array_equal(f['block_resolution'], [7, 14])


# ----------------------------------------------------------------------------- pictures

def test_reconstruction_and_interpolation_grids(run, trained, tmp_path):
    H = trained[0]
    images = data.load_data(H).test[np.array([0, 3])]
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f'im{i}.png'))
        Image.fromarray(im[..., 0]).save(paths[-1])
    rec = run('--reconstruct', '--indices', 0, 3, '--keep', '0,2,4')
    grid = np.asarray(Image.open(rec['png']))
    assert grid.shape == (4 * 28, 2 * 28) and rec['rows'] == ['original', 'k=0', 'k=2', 'k=4']
    np.testing.assert_array_equal(grid[:28], np.concatenate(images[..., 0], 1))
    again = run('--reconstruct', '--images', *paths, '--keep', '0,2,4')  # files give the same result
    np.testing.assert_array_equal(np.asarray(Image.open(again['png'])), grid)
    assert again['columns'] == paths
    assert run('--reconstruct', '--indices', 5)['keep'] == [0, 1, 2, 3, 4]  # the release grid's spread, then all
    inter = run('--interpolate', '--images', *paths, '--interp_steps', 5, '--interp_layers', '2,4')
    grid = np.asarray(Image.open(inter['png']))
    assert grid.shape == (2 * 28, 7 * 28) and inter['interp_layers'] == [2, 4]
    for row in (grid[:28], grid[28:]):
        np.testing.assert_array_equal(row[:, :28], images[0, ..., 0])
        np.testing.assert_array_equal(row[:, -28:], images[1, ..., 0])


# ----------------------------------------------------------------------------- run folder, processes

def test_run_folder_checkpoint_brings_its_architecture(trained, fm_root, tmp_path):
    """No --restore_ema_path and no architecture flags: the newest checkpoint of
    {save_dir}/{desc} is evaluated with the architecture saved beside it."""
    from utils import Dist, logger
    H, model, _ = trained
    H = preset('fashion_mnist', data_root=fm_root, save_dir=str(tmp_path), desc='run', **ARCH)
    H.run_dir = str(tmp_path / 'run')
    os.makedirs(H.run_dir)
    checkpoints.save_checkpoint(H, Dist(), 'latest', model, model, torch.optim.AdamW(model.parameters()), None,
                          logger(os.path.join(H.run_dir, 'log')),
                          checkpoints.Progress(step=100, epoch=0, batch=0, best_eval=float('inf')))
    st = evaluate.main(['--save_dir', str(tmp_path), '--desc', 'run', '--data_root', fm_root, '--kl_stats',
                        '--n_images', '4', '--threads', '1', '--num_workers', '0', '--no_progress'])
    assert os.path.dirname(st['json']) == H.run_dir and st['weights'].endswith('latest-model-ema.th')
    assert len(st['blocks']) == N_BLOCKS


def test_two_processes_give_the_single_process_results(run, trained, fm_root, tmp_path):
    """torchrun with 2 CPU processes: each a shard, gathered on rank 0.  With one image per
    pass every image's noise depends only on its position, so the results are the same."""
    common = ['--hps', 'fashion_mnist', *[f'--{k}={v}' for k, v in ARCH.items()], '--data_root', fm_root,
              '--restore_ema_path', trained[2], '--out_dir', str(tmp_path / 'dist'), '--threads', '1',
              '--num_workers', '0', '--no_progress', '--n_images', '7']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for mode in (['--n_importance', '4', '--iw_batch', '4'], ['--encode', '--encode_what', 'both', '--n_batch_eval', '1']):
        p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                            str(_free_port()), os.path.join(ROOT, 'evaluate.py'), *common, *mode],
                           capture_output=True, text=True, env=env, timeout=240, cwd=str(tmp_path))
        assert p.returncode == 0, p.stderr[-3000:]
    one = run('--n_importance', 4, '--iw_batch', 4, '--n_images', 7)
    two = np.load(tmp_path / 'dist' / 'iwae-test-k4.npz')
    for k in ('image_index', 'iw_nll_nats_per_dim', 'elbo_nats_per_dim'):
        np.testing.assert_allclose(two[k], np.load(one['per_image'])[k], rtol=1e-6)
    enc = run('--encode', '--encode_what', 'both', '--n_batch_eval', 1, '--n_images', 7)
    with np.load(enc['path']) as a, np.load(tmp_path / 'dist' / 'latents-test.npz') as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            if a[k].dtype.kind == 'f':
                np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
            else:
                np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def bad_images(tmp_path):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / 'big.png')
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / 'rgb.png')
    (tmp_path / 'junk.png').write_bytes(b'not an image')
    return tmp_path


@pytest.mark.parametrize('flags,match', [
    ([], 'choose exactly one mode.*got none'),
    (['--kl_stats', '--encode'], 'exactly one mode.*--kl_stats and --encode'),
    (['--n_importance', 0], '--n_importance 0: must be >= 1'),
    (['--n_importance', 4, '--n_images', -1], '--n_images -1: must be >= 0'),
    (['--reconstruct', '--indices', 0, '--keep', '2,9'], r'--keep.*9 is out of range \[0, 4\]'),
    (['--reconstruct', '--indices', 0, '--keep', 'two'], '--keep.*comma-separated integers'),
    (['--reconstruct'], 'needs input images'),
    (['--reconstruct', '--indices', 500], '--indices 500 is out of range: --split test has 64 images'),
    (['--reconstruct', '--images', 'IMG/missing.png'], 'missing.png: no such file'),
    (['--reconstruct', '--images', 'IMG/big.png'], 'takes 28x28 L images.*32x32 L'),
    (['--reconstruct', '--images', 'IMG/rgb.png'], 'takes 28x28 L images.*28x28 RGB'),
    (['--reconstruct', '--images', 'IMG/junk.png'], 'cannot read it as an image'),
    (['--reconstruct', '--images', 'IMG/big.png', '--indices', 0], 'either --images or --indices'),
    (['--interpolate', '--indices', 0, 1, 2], 'exactly two images, got 3'),
    (['--interpolate', '--indices', 0, 1, '--interp_layers', '0'], r'--interp_layers.*0 is out of range \[1, 4\]'),
    (['--kl_stats', '--indices', 0], '--indices applies to --reconstruct/--interpolate'),
    (['--interpolate', '--indices', 0, 1, '--keep', '1'], '--keep applies to --reconstruct, not to --interpolate'),
    (['--encode', '--encode_blocks', '2-7'], r'--encode_blocks.*4 is out of range \[0, 3\]'),
])
def test_bad_arguments_are_one_line_errors(run, bad_images, flags, match):
    flags = [str(f).replace('IMG', str(bad_images)) for f in flags]
    with pytest.raises(UserError, match=match) as e:
        run(*flags)
    assert '\n' not in str(e.value)


def test_weights_of_another_model_are_refused(run, tmp_path):
    torch.manual_seed(0)
    other = VAE(preset('fashion_mnist', **dict(ARCH, zdim=3)))
    torch.save(other.state_dict(), tmp_path / 'other.th')
    with pytest.raises(UserError, match='does not fit the model'):
        run('--kl_stats', weights=str(tmp_path / 'other.th'))
    with pytest.raises(UserError, match='no such file'):
        run('--kl_stats', weights=str(tmp_path / 'nothing.th'))


def test_command_line_error_exits_2_with_one_line(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'), '--kl_stats', '--reconstruct'],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith('error: choose exactly one mode') and p.stderr.count('\n') == 1

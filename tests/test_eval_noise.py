"""The evaluation's keyed posterior noise (vae_helpers.KeyedNormal): Philox-4x32-10 matches
Random123's known answers, its normals are standard and independent across keys, a slice
of a batch draws what the whole batch draws, and so a checkpoint's test ELBO is the same
for any --n_batch_eval and any number of processes."""
import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import evaluation
import train_step
from conftest import load_tiny, ref
from utils import Dist
from vae_helpers import KeyedNormal, _mulhilo32, philox4x32

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY32 = ['--hps', 'cifar10', '--width', '32', '--zdim', '4', '--num_mixtures', '3',
          '--enc_blocks', '32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x2',
          '--dec_blocks', '1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2', '--no_progress', '--num_workers', '0',
          '--threads', '1']


# ----------------------------------------------------------------------------- the generator

PI_COUNTER, PI_KEY = (0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0)


@pytest.mark.parametrize('rounds,counter,key,want', [  # Random123's kat_vectors, philox4x32 7 and 10
    (7, (0, 0, 0, 0), (0, 0), (0x5f6fb709, 0x0d893f64, 0x4f121f81, 0x4f730a48)),
    (7, (0xffffffff,) * 4, (0xffffffff,) * 2, (0x5207ddc2, 0x45165e59, 0x4d8ee751, 0x8c52f662)),
    (7, PI_COUNTER, PI_KEY, (0x4dfccaba, 0x190a87f0, 0xc47362ba, 0xb6b5242a)),
    (10, (0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    (10, (0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    (10, PI_COUNTER, PI_KEY, (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
])
def test_philox_matches_the_known_answers(rounds, counter, key, want):
    out = philox4x32([torch.tensor([c]) for c in counter], key, rounds)
    assert [int(w) for w in out] == list(want)


def test_keyed_normal_is_philox_then_box_muller():
    """Element g of plane 0/1 of a row: radius from word 0, angle from word 1 of block g."""
    z = KeyedNormal(9, torch.tensor([4, 11]), samples=torch.tensor([0, 2])).normal(5, (3, 3))  # 9 elements, G = 3
    w = philox4x32((torch.arange(3), torch.tensor([5]), torch.tensor([[4], [11]]), torch.tensor([[0], [2]])),
                   (9, 0), KeyedNormal.ROUNDS)
    u = [((x >> 8).double() + 0.5) / 2 ** 24 for x in w]
    r, theta = torch.sqrt(-2 * torch.log(u[0])), 2 * np.pi * u[1]
    flat = z.view(2, -1).double()
    torch.testing.assert_close(flat[:, :3], r * torch.cos(theta), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat[:, 3:6], r * torch.sin(theta), rtol=1e-5, atol=1e-6)


def test_mulhilo_is_exact_integer_arithmetic():
    a = torch.cat([torch.tensor([0, 1, 0xffffffff, 0x80000000]),
                   torch.randint(0, 2 ** 32, (1000,), generator=torch.Generator().manual_seed(0))])
    for m in (0xD2511F53, 0xCD9E8D57, 0xffffffff):
        hi, lo = _mulhilo32(a.clone(), m)
        assert [(h << 32) | l for h, l in zip(hi.tolist(), lo.tolist())] == [x * m for x in a.tolist()]


def test_normals_are_standard():
    z = KeyedNormal(7, torch.arange(64)).normal(3, (4, 32, 32)).double().flatten()  # 262144 values
    n = len(z)
    assert abs(z.mean()) < 5 / n ** 0.5 and abs(z.var() - 1) < 5 * (2 / n) ** 0.5
    assert abs((z ** 3).mean()) < 5 * (15 / n) ** 0.5 and abs((z ** 4).mean() - 3) < 5 * (96 / n) ** 0.5
    # the distribution, not only moments: the empirical CDF against Phi (Kolmogorov-Smirnov at 1e-3)
    s = z.sort().values
    phi = 0.5 * (1 + torch.erf(s / 2 ** 0.5))
    ks = torch.maximum((torch.arange(1, n + 1) / n - phi).abs(), (torch.arange(n) / n - phi).abs()).max()
    assert ks < 1.95 / n ** 0.5


def test_every_key_part_gives_independent_noise():
    base = dict(seed=1, images=torch.arange(32), samples=None)
    shape = (4, 16, 16)

    def draw(layer=0, **kw):
        k = dict(base, **kw)
        return KeyedNormal(k['seed'], k['images'], k['samples']).normal(layer, shape).flatten().double()

    z = draw()
    assert torch.equal(z, draw())  # a pure function of the key
    others = [draw(seed=2), draw(images=torch.arange(32) + 32), draw(samples=torch.ones(32, dtype=torch.int64)),
              draw(layer=1), draw(seed=1 + 0x10000)]
    n = len(z)
    for o in others:
        corr = torch.corrcoef(torch.stack([z, o]))[0, 1]
        assert abs(corr) < 5 / n ** 0.5
    # neighbouring elements and images are uncorrelated too
    rows = KeyedNormal(1, torch.arange(2048)).normal(0, (8,)).double()
    c = torch.corrcoef(rows.T)
    assert (c - torch.eye(8)).abs().max() < 5 / 2048 ** 0.5
    assert len({tuple(r) for r in rows.tolist()}) == 2048  # no two images share their noise


def test_a_slice_of_the_batch_draws_the_same_noise():
    whole = KeyedNormal(5, torch.arange(10))
    part = KeyedNormal(5, torch.arange(3, 7))
    for layer, shape in [(0, (4, 1, 1)), (2, (4, 7, 7)), (9, (3, 5, 5))]:  # odd sizes: a partial last block
        assert torch.equal(whole.normal(layer, shape)[3:7], part.normal(layer, shape))
    # samples 2..4 of every image, sample-major, as evaluation.log_weights repeats a batch
    rep = whole.repeat(2, 3).normal(1, (4, 8, 8)).view(3, 10, 4, 8, 8)
    for k in range(3):
        one = KeyedNormal(5, torch.arange(10), samples=torch.full((10,), 2 + k)).normal(1, (4, 8, 8))
        assert torch.equal(rep[k], one)


def test_keyed_noise_is_only_used_inside_its_context():
    H, model, x_in, x_target, _ = load_tiny()
    with torch.no_grad():
        with model.keyed_noise(KeyedNormal(0, torch.arange(4))):
            a = model.forward_per_image(x_in, x_target)['elbo']
            state = torch.get_rng_state()
            b = model.forward_per_image(x_in, x_target)['elbo']
            assert torch.equal(torch.get_rng_state(), state)  # no draw from the RNG
        assert all(blk.noise is None for blk in model.decoder.dec_blocks)
        torch.manual_seed(0)
        c = model.forward_per_image(x_in, x_target)['elbo']
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- the test ELBO

def _elbo(H, model, source, n_batch_eval, rank=0, world=1):
    H.n_batch_eval = n_batch_eval
    return evaluation.evaluate(H, Dist(rank=rank, world_size=world), model, source)


def test_elbo_does_not_depend_on_batch_size_or_shards():
    """In one process: --n_batch_eval 1, 5 and 64, and the ranks' shards of 2 and 3 processes
    (their per-image sums put together as the all-reduce would) give one number."""
    torch.set_num_threads(1)
    H, model, _, _, _ = load_tiny()
    H.update(no_progress=True, num_workers=0)
    source = data.ArraySource(np.random.RandomState(0).randint(0, 256, (23, 32, 32, 3)).astype(np.uint8), 'mem')
    ref_ = _elbo(H, model, source, 64)
    for b in (1, 5):
        assert _elbo(H, model, source, b)['elbo'] == pytest.approx(ref_['elbo'], rel=1e-6, abs=0)
    for world in (2, 3):
        parts = [_elbo(H, model, source, 4, r, world) for r in range(world)]
        assert sum(p['n_images'] for p in parts) == 23
        total = sum(p['elbo'] * p['n_images'] for p in parts) / 23
        assert total == pytest.approx(ref_['elbo'], rel=1e-6, abs=0)
    state = torch.get_rng_state()
    _elbo(H, model, source, 8)
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG stream is untouched


@pytest.fixture(scope='module')
def cifar_root(tmp_path_factory):
    """cifar-10-batches-py: 5 x 1010 training images (the split holds out 5000), 41 test images."""
    folder = tmp_path_factory.mktemp('cifar') / 'cifar-10-batches-py'
    os.makedirs(folder)
    rng = np.random.RandomState(3)
    for name, n in [(f'data_batch_{i}', 1010) for i in range(1, 6)] + [('test_batch', 41)]:
        with open(folder / name, 'wb') as f:
            pickle.dump({b'data': rng.randint(0, 256, (n, 3072)).astype(np.uint8), b'labels': [0] * n}, f)
    return str(folder.parent)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_release_bundle_test_elbo_is_the_same_for_1_and_2_processes(cifar_root, tmp_path):
    """train.py --test_eval of the release-format bundle: one process with --n_batch_eval 1,
    one with 41, and two torchrun (gloo) processes with 8 agree to 1e-6 relative."""
    ema = ref('tiny32', 'tiny32-iter-10-model-ema.th')
    runs = {'one-b1': ([], 1), 'one-b41': ([], 41),
            'two-b8': ([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                        '--master_port', str(_free_port())], 8)}
    out = {}
    for desc, (launcher, b) in runs.items():
        cmd = (launcher or [sys.executable]) + ['train.py', *TINY32, '--data_root', cifar_root, '--test_eval',
                                                '--restore_ema_path', ema, '--save_dir', str(tmp_path),
                                                '--desc', desc, '--n_batch_eval', str(b)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS='1'))
        assert p.returncode == 0, p.stderr[-3000:]
        lines = [json.loads(x) for x in open(tmp_path / desc / 'log.jsonl')]
        out[desc] = [z for z in lines if z.get('type') == 'test_loss'][-1]
    for desc in ('one-b41', 'two-b8'):
        assert out[desc]['n_images'] == 41
        for k in ('elbo', 'distortion', 'rate'):
            assert out[desc][k] == pytest.approx(out['one-b1'][k], rel=1e-6, abs=0), (desc, k)
        # from sums of squares: float rounding of the per-image values is amplified by the cancellation
        assert out[desc]['elbo_se'] == pytest.approx(out['one-b1']['elbo_se'], rel=1e-4)


# ----------------------------------------------------------------------------- cost on a GPU

def test_a_keyed_draw_takes_few_operators():
    """On a GPU every aten operator is a kernel launch.  A draw of a layer whose size was
    drawn before takes at most 75 non-view operators (181 before the four counter words went
    through Philox in two stacked pairs), the first draw of a size at most 100; and a cifar10
    evaluation forward with keyed noise, whose layers of one size are drawn together, at most
    1.25 times the operators of one with the device's RNG (4.2 times before).  Counted at the
    dispatcher as bench.py counts a training step, on the meta device (no values needed).  A
    count, not a time: it cannot be noisy."""
    from benchmark import count_aten_ops
    from hps import preset
    from vae import VAE
    noise = KeyedNormal(3, torch.arange(6))
    _, first = count_aten_ops(lambda: noise.normal(0, (4, 8, 8)))
    _, again = count_aten_ops(lambda: noise.normal(1, (4, 8, 8)))
    assert first <= 100 and again <= 75
    H = preset('cifar10')
    with torch.device('meta'):
        model = VAE(H).eval()
        x_in, x_target = torch.zeros(2, 32, 32, 3), torch.zeros(2, 32, 32, 3)
    with torch.no_grad():
        _, device_rng = count_aten_ops(lambda: model.forward_per_image(x_in, x_target))
        with model.keyed_noise(KeyedNormal(0, torch.arange(2, device='meta'))):
            _, keyed = count_aten_ops(lambda: model.forward_per_image(x_in, x_target))
    assert keyed <= 1.25 * device_rng, (keyed, device_rng)


def test_layers_drawn_together_draw_what_each_draws_alone(monkeypatch):
    """Told the draws to come (as VAE.keyed_noise tells it), KeyedNormal makes those of one
    shape together, at most GROUP_BLOCKS Philox blocks at a time: every layer gets bit for bit
    what a draw of its own gives, in a second pass too."""
    draws = [(0, (4, 1, 1)), (1, (4, 4, 4)), (2, (4, 4, 4)), (3, (3, 5, 5)), (4, (4, 4, 4)), (5, (3, 5, 5))]
    alone = {layer: KeyedNormal(7, torch.arange(5) + 20).normal(layer, shape) for layer, shape in draws}
    monkeypatch.setattr(KeyedNormal, 'GROUP_BLOCKS', 190)  # two layers of each shape at a time (5 x 16, 5 x 19 blocks)
    noise = KeyedNormal(7, torch.arange(5) + 20)
    noise.expect(draws)
    for _ in range(2):
        for layer, shape in draws:
            assert torch.equal(noise.normal(layer, shape), alone[layer]), layer


def test_evaluation_copies_only_the_images_to_the_device():
    """evaluation.evaluate's per-batch copies from the host to the device: the uint8 images only.
    The image positions that key the noise are made on the device (a copy from pageable
    host memory waits for the device at every batch).  On the meta device, which stands in
    for a GPU (tests/test_device.py)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from test_device import ARCH, HostReads
    from hps import preset

    class HostToDevice(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and args[0].device.type == 'cpu' and \
                    torch.device(kwargs.get('device') or 'cpu').type == 'meta':
                self.dtypes.append(args[0].dtype)
            return func(*args, **kwargs)

    H = preset('fashion_mnist', **ARCH)
    H.no_progress = True
    meta = Dist(device=torch.device('meta'))
    _, ema = train_step.build_models(H, meta)
    images = data.ArraySource(np.random.RandomState(0).randint(0, 256, (7, 28, 28, 1)).astype(np.uint8), 'mem')
    with HostReads():
        evaluation.evaluate(H, meta, ema, images)  # once first: constants made once per process
        copies = HostToDevice()
        with copies:
            evaluation.evaluate(H, meta, ema, images)
    assert copies.dtypes == [torch.uint8] * 3  # 7 images in batches of 3

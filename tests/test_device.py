"""Host/device mixes, caught without a GPU.

The training step, validation, the sample grid and evaluate.py's modes run with every
model tensor on PyTorch's ``meta`` device, which plays the accelerator: like CUDA it
refuses to meet CPU tensors in one op (except 0-dim CPU scalars in elementwise ops), so a
tensor made on the CPU inside a step (no ``device=``) raises here as it would on a GPU.
Meta tensors hold no values: reads to the host (``.item()``, ``.cpu()``) are answered with
placeholders by ``HostReads``, so these tests check where tensors live and that every
path runs, not numbers (the other test files check those)."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data
import evaluate
import train
import utils
from hps import preset
from utils import Dist

META = torch.device('meta')
ARCH = dict(width=16, zdim=2, num_mixtures=2, enc_blocks='28x1,28d2,14x1,14d2,7x1,7d7,1x1',
            dec_blocks='1x1,7m1,14m7,28m14', n_batch=4, n_batch_eval=3, num_workers=0)


class HostReads(TorchDispatchMode):
    """Answers a host read of a meta tensor with ``fill``: ``.item()`` gives it, a copy to
    the CPU gives a tensor of the right shape and dtype full of it (0: a training step sees
    no NaN and takes its update path; 1: an evaluation counts one image).  Everything else
    runs as usual, device checks included."""

    def __init__(self, fill=1):
        super().__init__()
        self.fill = fill

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and torch.is_tensor(args[0]) else None
        if src is not None and src.device.type == 'meta':
            if func is torch.ops.aten._local_scalar_dense.default:
                return torch.tensor(self.fill, dtype=src.dtype).item()
            if func is torch.ops.aten._to_copy.default and torch.device(kwargs.get('device') or META).type == 'cpu':
                return torch.full(src.shape, self.fill, dtype=kwargs.get('dtype') or src.dtype)
        return func(*args, **kwargs)


@pytest.fixture
def H(tmp_path):
    H = preset('fashion_mnist', **ARCH)
    H.no_progress = True
    H.save_dir = str(tmp_path)
    return H


@pytest.fixture
def images():
    return np.random.RandomState(0).randint(0, 256, (7, 28, 28, 1)).astype(np.uint8)


def _models(H, channels_last=False, grad_checkpoint=False):
    H.channels_last, H.grad_checkpoint = channels_last, grad_checkpoint
    model, ema = train.build_models(H, Dist(device=META))
    assert all(p.device == META for p in [*model.parameters(), *ema.parameters()])
    return model, ema


@pytest.mark.parametrize('layout', ['contiguous', 'channels_last', 'grad_checkpoint'])
def test_training_step_keeps_tensors_on_the_device(H, images, layout):
    """The step that failed on every GPU: utils.stats_over_ranks stacked the statistics
    (on the device) with a flag made on the CPU."""
    with HostReads(fill=0):
        model, ema = _models(H, layout == 'channels_last', layout == 'grad_checkpoint')
        optimizer = train.make_optimizer(H, model, META)
        x_in, x_target = data.preprocess(H, torch.from_numpy(images[:4]).to(META))
        assert x_in.device == META and x_target.device == META
        for _ in range(2):
            stats, stop = train.training_step(H, x_in, x_target, model, model, ema, optimizer, None,
                                              train.precision_context(H, META), 1e-3, False)
        assert stats['skipped_updates'] == 0 and not stop  # the update path (optimizer, EMA) ran
        assert all(s['exp_avg'].device == META for s in optimizer.state.values())


def test_stats_over_ranks_stacks_on_the_statistics_device():
    with HostReads(fill=0):
        out = utils.stats_over_ranks(dict(a=torch.zeros((), device=META), flag=torch.tensor(1.0), b=2.0))
    assert sorted(out) == ['a', 'b', 'flag']


def test_validation_and_test_eval_keep_tensors_on_the_device(H, images):
    with HostReads():
        _, ema = _models(H)
        stats = train.evaluate(H, Dist(device=META), ema, data.ArraySource(images, 'in memory'))
    assert stats['n_images'] == 1  # the placeholder count: ones from HostReads
    assert {'elbo', 'elbo_se', 'distortion', 'rate'} <= set(stats)


def test_sample_grid_and_samples_keep_tensors_on_the_device(H, images):
    with HostReads():
        _, ema = _models(H)
        grid = train.sample_grid(H, ema, torch.from_numpy(images[:3]), META)
        samples = ema.forward_uncond_samples(2, t=[1.0, 0.9, 0.8, 0.7])
    rows = 1 + H.num_variables_visualize + H.num_temperatures_visualize
    assert grid.shape == (rows * 28, 3 * 28, 1) and grid.dtype == np.uint8
    assert samples.shape == (2, 28, 28, 1)


@pytest.mark.parametrize('mode', ['n_importance', 'kl_stats', 'encode', 'reconstruct', 'interpolate'])
def test_evaluate_modes_keep_tensors_on_the_device(H, images, mode, tmp_path):
    d = Dist(device=META)
    H.update(n_importance=3, iw_batch=2, encode_what='both', encode_list=[0, 3], split='test',
             keep_list=[0, 2, 4], interp_list=[1, 4], interp_steps=3, rest_temperature=0.1, inactive_threshold=0.01)
    source = data.ArraySource(images, 'in memory')
    bar = evaluate.tqdm(disable=True)
    with HostReads():
        _, ema = _models(H)
        ema.requires_grad_(False)
        if mode == 'n_importance':
            summary, per_image = evaluate.run_iwae(H, d, ema, source, bar)
            assert per_image['image_index'].tolist() == list(range(7))
        elif mode == 'kl_stats':
            assert len(evaluate.run_kl_stats(H, d, ema, source, bar)['blocks']) == 4
        elif mode == 'encode':
            out = evaluate.run_encode(H, d, ema, source, str(tmp_path / 'latents.npz'), bar)
            with np.load(out['path']) as z:
                assert z['z_3'].shape == (7, 2, 28, 28) and z['image_index'].tolist() == list(range(7))
        elif mode == 'reconstruct':
            assert evaluate.run_reconstruct(H, d, ema, images[:2], bar).shape == (4, 2, 28, 28, 1)
        else:
            grid, _ = evaluate.run_interpolate(H, d, ema, images[:2], bar)
            assert grid.shape == (2, 5, 28, 28, 1)

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

import checkpoints
import data
import evaluation
import pictures
import train_step
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
    model, ema = train_step.build_models(H, Dist(device=META))
    assert all(p.device == META for p in [*model.parameters(), *ema.parameters()])
    return model, ema


@pytest.mark.parametrize('layout', ['contiguous', 'channels_last', 'grad_checkpoint'])
def test_training_step_keeps_tensors_on_the_device(H, images, layout):
    """The step once failed on every GPU: its statistics (on the device) were stacked with a
    stop flag made on the CPU.  Everything the step returns stays on the device, and the
    masked update (fused AdamW, EMA) runs there too."""
    with HostReads(fill=0):
        model, ema = _models(H, layout == 'channels_last', layout == 'grad_checkpoint')
        optimizer = train_step.make_optimizer(H, model, META)
        x_in, x_target = data.preprocess(H, torch.from_numpy(images[:4]).to(META))
        assert x_in.device == META and x_target.device == META
        for _ in range(2):
            stats, stop = train_step.training_step(H, x_in, x_target, model, model, ema, optimizer, None,
                                              train_step.precision_context(H, META), 1e-3, False)
        assert all(v.device == META for v in stats.values()) and stop.device == META
        assert all(s['exp_avg'].device == META for s in optimizer.state.values())


def test_validation_and_test_eval_keep_tensors_on_the_device(H, images):
    with HostReads():
        _, ema = _models(H)
        stats = evaluation.evaluate(H, Dist(device=META), ema, data.ArraySource(images, 'in memory'))
    assert stats['n_images'] == 1  # the placeholder count: ones from HostReads
    assert {'elbo', 'elbo_se', 'distortion', 'rate'} <= set(stats)


def test_sample_grid_and_samples_keep_tensors_on_the_device(H, images):
    with HostReads():
        _, ema = _models(H)
        grid = pictures.sample_grid(H, ema, torch.from_numpy(images[:3]), META)
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
    bar = utils.progress_bar(off=True)
    with HostReads():
        _, ema = _models(H)
        ema.requires_grad_(False)
        if mode == 'n_importance':
            summary, per_image = evaluation.run_iwae(H, d, ema, source, bar)
            assert per_image['image_index'].tolist() == list(range(7))
        elif mode == 'kl_stats':
            assert len(evaluation.run_kl_stats(H, d, ema, source, bar)['blocks']) == 4
        elif mode == 'encode':
            out = evaluation.run_encode(H, d, ema, source, str(tmp_path / 'latents.npz'), bar)
            with np.load(out['path']) as z:
                assert z['z_3'].shape == (7, 2, 28, 28) and z['image_index'].tolist() == list(range(7))
        elif mode == 'reconstruct':
            assert pictures.run_reconstruct(H, d, ema, images[:2], bar).shape == (4, 2, 28, 28, 1)
        else:
            grid, _ = pictures.run_interpolate(H, d, ema, images[:2], bar)
            assert grid.shape == (2, 5, 28, 28, 1)


# ----------------------------------------------------------------------------- optimizer files

def _grads(model, step):
    """The same gradient values for every layout: each laid out like its parameter."""
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))


def test_optimizer_state_from_the_other_layout_takes_its_parameters_strides(H, tmp_path):
    """A contiguous run's -opt.th continued by a --channels_last run: the fused AdamW steps
    equal those of the contiguous run (before, the state kept the file's strides and the
    updates went to the wrong elements)."""
    cpu = torch.device('cpu')
    ref_model, _ = train_step.build_models(H, Dist())
    opt = train_step.make_optimizer(H, ref_model, cpu)
    for step in range(2):
        _grads(ref_model, step)
        opt.step()
    torch.save(opt.state_dict(), tmp_path / 'latest-opt.th')
    weights = {k: v.clone() for k, v in ref_model.state_dict().items()}
    for step in range(2, 5):
        _grads(ref_model, step)
        opt.step()
    H.channels_last = True
    model, _ = train_step.build_models(H, Dist())
    model.load_state_dict(weights)
    conv = model.decoder.dec_blocks[-1].resnet.c2.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    opt = train_step.make_optimizer(H, model, cpu)
    checkpoints.load_optimizer_file(opt, str(tmp_path / 'latest-opt.th'))
    for p in model.parameters():
        assert all(opt.state[p][k].stride() == p.stride() for k in ('exp_avg', 'exp_avg_sq'))
    for step in range(2, 5):
        _grads(model, step)
        opt.step()
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_loading_an_apex_file_keeps_the_fused_optimizer():
    """The release's apex FusedAdam file has no 'fused' key in its param groups; loading it
    must not switch this run (and every later checkpoint) to the foreach implementation."""
    from conftest import load_tiny, ref
    H, model, _, _, _ = load_tiny()
    model.train()
    opt = train_step.make_optimizer(H, model, torch.device('cpu'))
    assert opt.param_groups[0]['fused'] is True
    checkpoints.load_optimizer_file(opt, ref('tiny32', 'apex_opt.th'))
    for g in opt.param_groups:
        assert g['fused'] is True and not g['foreach'] and not g['capturable'] and g['decoupled_weight_decay']
        for p in g['params']:
            step = opt.state[p]['step']
            assert step.dtype == torch.float32 and step.device == p.device and step.item() == 10
    # and a file from a foreach run loaded into a fused one stays fused, and vice versa
    foreach = torch.optim.AdamW(model.parameters(), foreach=True)
    checkpoints.load_optimizer_file(foreach, ref('tiny32', 'apex_opt.th'))
    assert foreach.param_groups[0]['foreach'] is True and not foreach.param_groups[0]['fused']


# ----------------------------------------------------------------------------- launch

class _FakeUdp:
    """Stands in for socket.socket: records connect() and answers getsockname()."""
    calls = []

    def __init__(self, family, kind):
        assert kind == utils.socket.SOCK_DGRAM  # UDP: connect() sends nothing
        self.calls.append(('socket', family, kind))

    def connect(self, addr):
        self.calls.append(('connect', addr))
        if self.fail:
            raise OSError('Network is unreachable')

    def getsockname(self):
        return (self.addr, 40000)

    def send(self, *a):
        raise AssertionError('nothing may be sent')

    sendto = send

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize('case', ['env', 'one_node', 'route', 'no_route'])
def test_master_address(monkeypatch, capsys, case):
    monkeypatch.delenv('MASTER_ADDR', raising=False)
    monkeypatch.setattr(utils.socket, 'gethostname', lambda: 'node0')
    monkeypatch.setattr(utils.socket, 'gethostbyname', lambda name: '127.0.1.1')  # Debian's /etc/hosts
    _FakeUdp.calls, _FakeUdp.addr, _FakeUdp.fail = [], '10.1.2.3', case == 'no_route'
    monkeypatch.setattr(utils.socket, 'socket', _FakeUdp)
    if case == 'env':
        monkeypatch.setenv('MASTER_ADDR', 'head.cluster')
        assert utils.master_address(one_node=False) == 'head.cluster'
    elif case == 'one_node':
        assert utils.master_address(one_node=True) == '127.0.0.1'
    elif case == 'route':
        assert utils.master_address(one_node=False) == '10.1.2.3'
        dest = [c[1] for c in _FakeUdp.calls if c[0] == 'connect'][0]
        assert not dest[0].startswith('127.')  # a route off this machine
    else:
        assert utils.master_address(one_node=False) == '127.0.1.1'
        assert 'set MASTER_ADDR' in capsys.readouterr().err
    assert case in ('route', 'no_route') or not _FakeUdp.calls


@pytest.mark.parametrize('visible,local_rank,want', [(1, 0, 0), (1, 3, 0), (4, 0, 0), (4, 3, 3), (8, 5, 5),
                                                     (2, 2, None), (0, 0, None)])
def test_cuda_device_of_a_rank(monkeypatch, visible, local_rank, want):
    """Per-rank CUDA_VISIBLE_DEVICES (one GPU visible) -> that GPU; all visible -> GPU local_rank."""
    from hps import UserError
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: visible)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: visible > 0)
    if want is None:
        with pytest.raises(UserError, match='visible'):
            utils.cuda_device(local_rank)
    else:
        assert utils.cuda_device(local_rank) == torch.device('cuda', want)


@pytest.mark.parametrize('visible,local_rank,want', [(1, 3, 0), (4, 3, 3), (2, 1, 1), (1, 0, 0)])
def test_ddp_gets_the_gpu_the_process_uses(H, monkeypatch, visible, local_rank, want):
    """DDP's device_ids name the GPU utils.cuda_device chose for the process, not its local
    rank: with one GPU visible per process (per-rank CUDA_VISIBLE_DEVICES, Slurm's
    --gpus-per-task) local rank 3 computes on cuda:0, and device_ids=[3] would fail with
    "invalid device ordinal" at its first step."""
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: visible)
    d = Dist(rank=local_rank, world_size=4, local_rank=local_rank, device=utils.cuda_device(local_rank))
    got = {}

    def ddp(module, device_ids=None):
        got['device_ids'] = device_ids
        return module
    monkeypatch.setattr(train_step, 'DistributedDataParallel', ddp)
    model, _ = _models(H)
    assert train_step.wrap_for_training(H, model, d) is model
    as_devices = [i if isinstance(i, torch.device) else torch.device('cuda', i) for i in got['device_ids']]
    assert as_devices == [d.device] == [torch.device('cuda', want)]

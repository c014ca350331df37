"""End-to-end training on CPU: single process, torchrun and mpiexec, restore of the
release's files, exact resume, crash safety, signals, skipped updates, bad input."""
import glob
import gzip
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoints

from conftest import ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--hps', 'fashion_mnist', '--width', '16', '--zdim', '2', '--num_mixtures', '2',
        '--enc_blocks', '28x1,28d2,14x1,14d2,7x1,7d7,1x1', '--dec_blocks', '1x1,7m1,14m7,28m14',
        '--no_progress', '--num_workers', '0', '--threads', '1', '--n_batch_eval', '500',
        '--iters_per_images', '100000', '--valid_images', '300']
TINY32 = ['--hps', 'cifar10', '--width', '32', '--zdim', '4', '--num_mixtures', '3',
          '--enc_blocks', '32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x2',
          '--dec_blocks', '1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2', '--no_progress', '--num_workers', '0',
          '--threads', '1', '--n_batch_eval', '250', '--iters_per_images', '100000', '--valid_images', '300']


def write_idx_images(path, images):
    n, h, w = images.shape
    header = np.array([2051, n, h, w], dtype='>i4').tobytes()
    with gzip.open(path, 'wb') as f:
        f.write(header + images.astype(np.uint8).tobytes())


@pytest.fixture(scope='session')
def fmnist_root(tmp_path_factory):
    """A small Fashion-MNIST-format folder: 5200 training images (5000 go to valid), 300 test."""
    root = tmp_path_factory.mktemp('fm')
    os.makedirs(root / 'fashion_mnist')
    rng = np.random.RandomState(0)
    # smooth-ish images so the model has something to learn
    base = rng.randint(0, 256, (8, 28, 28))
    train = base[rng.randint(0, 8, 5200)] // 2 + rng.randint(0, 128, (5200, 28, 28))
    write_idx_images(root / 'fashion_mnist' / 'train-images-idx3-ubyte.gz', train)
    write_idx_images(root / 'fashion_mnist' / 't10k-images-idx3-ubyte.gz', train[:300])
    return str(root)


@pytest.fixture(scope='session')
def cifar_root(tmp_path_factory):
    """cifar-10-batches-py with 5 x 1050 training images and 200 test images."""
    root = tmp_path_factory.mktemp('cifar')
    folder = root / 'cifar-10-batches-py'
    os.makedirs(folder)
    rng = np.random.RandomState(1)
    for i in range(1, 6):
        with open(folder / f'data_batch_{i}', 'wb') as f:
            pickle.dump({b'data': rng.randint(0, 256, (1050, 3072)).astype(np.uint8), b'labels': [0] * 1050}, f)
    with open(folder / 'test_batch', 'wb') as f:
        pickle.dump({b'data': rng.randint(0, 256, (200, 3072)).astype(np.uint8), b'labels': [0] * 200}, f)
    return str(root)


def run(args, launcher=(), timeout=300, check=True, env=None):
    if launcher and launcher[0] == 'torchrun':  # torchrun's own module: no reliance on PATH or script shebangs
        cmd = [sys.executable, '-m', 'torch.distributed.run', *launcher[1:], 'train.py', *args]
    else:
        cmd = [*launcher, sys.executable, 'train.py', *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    if check and p.returncode != 0:
        raise AssertionError(f'{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    return p


def log_lines(run_dir, kind=None):
    lines = [json.loads(x) for x in open(os.path.join(run_dir, 'log.jsonl'))]
    return [z for z in lines if kind is None or z.get('type') == kind]


def train_losses(run_dir):
    """{step: elbo} of the per-step train_loss lines (iters_per_print 1)."""
    return {z['step']: z['elbo'] for z in log_lines(run_dir, 'train_loss') if 'lr' in z}


def event_scalars(run_dir, tag):
    """{step: value} of a scalar tag in the run's event file, which must be the only one
    (TensorBoard's own loader)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray
    stream, = glob.glob(os.path.join(run_dir, 'tensorboard', 'events.out.tfevents.*'))
    return {e.step: make_ndarray(v.tensor).item() for e in EventFileLoader(stream).Load() for v in e.summary.value
            if v.tag == tag}


def state_dict(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_single_process_run(fmnist_root, tmp_path):
    run(TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 'a', '--max_iters', '6',
                '--iters_per_print', '2', '--n_batch', '4'])
    rd = tmp_path / 'a'
    for suffix in ['model.th', 'model-ema.th', 'opt.th', 'log.jsonl', 'state.th']:
        assert (rd / f'latest-{suffix}').exists()
    tl = log_lines(rd, 'train_loss')
    assert [z['step'] for z in tl if 'lr' in z] == [0, 1, 2, 4]
    for z in tl:
        assert {'elbo', 'distortion', 'rate', 'grad_norm', 'skipped_updates', 'elbo_bpd'} <= set(z)
        assert abs(z['elbo_bpd'] - z['elbo'] / np.log(2)) < 1e-9
    ev = log_lines(rd, 'eval_loss')[-1]
    assert ev['n_images'] == 300 and np.isfinite(ev['elbo'])
    assert (rd / 'samples-1.png').exists() and (rd / 'loss.png').exists()
    st = torch.load(rd / 'latest-state.th', weights_only=True)
    assert st['step'] == 6 and st['epoch'] == 0 and st['batch'] == 6


def test_resume_equals_uninterrupted(fmnist_root, tmp_path):
    common = TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--iters_per_print', '1',
                     '--n_batch', '4', '--warmup_iters', '3', '--lr', '0.003']
    run(common + ['--desc', 'full', '--max_iters', '8'])
    run(common + ['--desc', 'split', '--max_iters', '4'])
    p = run(common + ['--desc', 'split', '--max_iters', '8'])  # same --desc: continues
    assert 'resuming from' in p.stdout
    full, split = train_losses(tmp_path / 'full'), train_losses(tmp_path / 'split')
    assert sorted(split) == list(range(8))
    assert [full[i] for i in range(8)] == [split[i] for i in range(8)]  # bit-for-bit
    a, b = state_dict(tmp_path / 'full' / 'latest-model.th'), state_dict(tmp_path / 'split' / 'latest-model.th')
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (state_dict(tmp_path / d / 'latest-model-ema.th') for d in ['full', 'split'])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_flag_without_checkpoint_is_an_error(fmnist_root, tmp_path):
    p = run(TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 'none', '--resume'],
            check=False)
    assert p.returncode == 2 and 'no complete checkpoint' in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _distributed_args(fmnist_root, save_dir):
    return TINY + ['--data_root', fmnist_root, '--save_dir', str(save_dir), '--max_iters', '4',
                   '--rank_invariant_noise', '--iters_per_print', '1', '--lr', '0.003']


@pytest.fixture(scope='session')
def single_run(fmnist_root, tmp_path_factory):
    """4 steps of one process with --n_batch 8: what 2 processes with --n_batch 4 must compute
    (_distributed_matches_single, for every launcher)."""
    save_dir = tmp_path_factory.mktemp('single')
    run(_distributed_args(fmnist_root, save_dir) + ['--desc', 'single', '--n_batch', '8'])
    return save_dir / 'single'


def _distributed_matches_single(single_run, fmnist_root, tmp_path, launcher, name):
    run(_distributed_args(fmnist_root, tmp_path) + ['--desc', name, '--n_batch', '4', '--port', str(free_port())],
        launcher=launcher)
    rc = log_lines(tmp_path / name, 'rank_check')
    assert rc and rc[-1]['param_spread'] == 0.0  # replicas identical
    a, b = state_dict(single_run / 'latest-model.th'), state_dict(tmp_path / name / 'latest-model.th')
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    la, lb = train_losses(single_run), train_losses(tmp_path / name)
    np.testing.assert_allclose([la[i] for i in range(4)], [lb[i] for i in range(4)], rtol=1e-5)
    # one event stream (rank 0's) holding the logged, all-reduced figures: one process's with the whole batch
    tb = event_scalars(tmp_path / name, 'train/elbo')
    assert tb == {i + 1: np.float32(lb[i]) for i in range(4)}
    single = event_scalars(single_run, 'train/elbo')
    np.testing.assert_allclose([tb[i] for i in range(1, 5)], [single[i] for i in range(1, 5)], rtol=1e-5)


def test_torchrun_two_processes_equal_one_process(single_run, fmnist_root, tmp_path):
    _distributed_matches_single(single_run, fmnist_root, tmp_path,
                                ['torchrun', '--standalone', '--nproc_per_node', '2'], 'torchrun')


def test_mpiexec_two_processes_equal_one_process(single_run, fmnist_root, tmp_path):
    mpiexec = shutil.which('mpiexec', path=os.path.dirname(sys.executable)) or shutil.which('mpiexec')
    assert mpiexec, 'mpiexec not found: pip install mpich mpi4py'
    _distributed_matches_single(single_run, fmnist_root, tmp_path, [mpiexec, '-n', '2'], 'mpi')


def test_restore_official_bundle_and_continue(cifar_root, tmp_path):
    b = ref('tiny32', 'tiny32-iter-10-')
    restore = ['--restore_path', b + 'model.th', '--restore_ema_path', b + 'model-ema.th',
               '--restore_optimizer_path', b + 'opt.th', '--restore_log_path', b + 'log.jsonl']
    p = run(TINY32 + restore + ['--data_root', cifar_root, '--save_dir', str(tmp_path), '--desc', 'r',
                                '--max_iters', '12', '--iters_per_print', '1', '--n_batch', '4'])
    assert 'starting at epoch 2, step 10' in p.stdout
    steps = sorted(train_losses(tmp_path / 'r'))
    assert steps == [10, 11]
    st = torch.load(tmp_path / 'r' / 'latest-state.th', weights_only=True)
    assert st['step'] == 12 and st['epoch'] == 2
    # the test split (cifar10: test_batch) through --test_eval on the released EMA file
    p = run(TINY32 + ['--data_root', cifar_root, '--save_dir', str(tmp_path), '--desc', 't', '--test_eval',
                      '--restore_ema_path', b + 'model-ema.th'])
    assert 'test elbo over 200 images' in p.stdout
    tl = log_lines(tmp_path / 't', 'test_loss')[-1]
    assert tl['n_images'] == 200 and abs(tl['elbo_bpd'] * np.log(2) - tl['elbo']) < 1e-9
    # the standard error over images is printed and logged beside the mean
    assert 0 < tl['elbo_se'] < tl['elbo'] and tl['elbo_bpd_se'] == pytest.approx(tl['elbo_se'] / np.log(2))
    assert f"{tl['elbo_bpd']:.5f} ± {tl['elbo_bpd_se']:.5f} bits/dim" in p.stdout


def test_standard_error_is_the_sample_std_over_sqrt_n():
    from evaluation import standard_error
    v = np.random.RandomState(0).gamma(2.0, 1.5, size=37) + 1e3  # a large mean: cancellation-prone
    want = np.std(v, ddof=1) / np.sqrt(len(v))
    assert standard_error(len(v), v.sum(), (v ** 2).sum()) == pytest.approx(want, rel=1e-6)
    assert np.isnan(standard_error(1, 3.0, 9.0))


def test_apex_optimizer_state_continues_adamw():
    """The release's apex FusedAdam file loads into AdamW and the next step continues
    the bias correction at t = 11 with the stored moments."""
    from hps import Hyperparams
    from train_step import make_optimizer
    from checkpoints import load_optimizer_file
    from vae import VAE
    H = Hyperparams(json.load(open(ref('tiny32', 'config.json')))['H'], cuda_graphs=False)
    model = VAE(H)
    opt = make_optimizer(H, model, torch.device('cpu'))
    load_optimizer_file(opt, ref('tiny32', 'apex_opt.th'))
    p = model.decoder.out_net.out_conv.weight
    st = opt.state[p]
    assert st['step'].item() == 10 and torch.all(st['exp_avg'] == 0.001)
    g = opt.param_groups[0]
    assert g['lr'] == 2e-05 and g['weight_decay'] == 0.01 and g['betas'] == (0.9, 0.9)
    torch.manual_seed(0)
    grad = torch.randn_like(p)
    p0 = p.detach().clone()
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    p.grad = grad
    lr, wd, b1, b2, eps, t = 2e-05, 0.01, 0.9, 0.9, 1e-8, 11
    m = b1 * 0.001 + (1 - b1) * grad.double()
    v = b2 * 1e-6 + (1 - b2) * grad.double() ** 2
    want = p0.double() * (1 - lr * wd) - lr / (1 - b1 ** t) * m / (v.sqrt() / np.sqrt(1 - b2 ** t) + eps)
    opt.step()
    torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-9)


def test_restore_log_reads_release_format():
    from checkpoints import restore_log
    assert restore_log(ref('tiny32', 'log.jsonl')) == (6.2851, 10, 2)


def test_crash_during_checkpoint_write_keeps_previous(fmnist_root, tmp_path, monkeypatch):
    run(TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 'c', '--max_iters', '3',
                '--n_batch', '4'])
    import train
    import train_step
    import utils
    rd = str(tmp_path / 'c')
    before = {f: open(os.path.join(rd, f), 'rb').read() for f in os.listdir(rd) if f.startswith('latest-')}
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)  # half a file on disk, then the process "dies"
        raise KeyboardInterrupt('crash')

    monkeypatch.setattr(utils.torch, 'save', dying_save)
    H, d, log = train.set_up(TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 'c'])
    model, ema = train_step.build_models(H, d)
    opt = train_step.make_optimizer(H, model, d.device)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(H, d, 'latest', model, ema, opt, None, log,
                                    checkpoints.Progress(step=99, epoch=0, batch=0, best_eval=1.0))
    after = {f: open(os.path.join(rd, f), 'rb').read() for f in os.listdir(rd) if f.startswith('latest-')}
    assert after == before  # nothing torn, no temporary left behind
    prefix, st = checkpoints.find_checkpoint(rd)
    assert prefix.endswith('latest') and st['step'] == 3
    # a set torn between renames (new model file, old state file) is recognised and skipped
    with open(os.path.join(rd, 'latest-model.th'), 'ab') as f:
        f.write(b'x')
    assert checkpoints.find_checkpoint(rd) == (None, None)


def test_sigterm_writes_latest_and_exits_cleanly(fmnist_root, tmp_path):
    args = TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 's', '--max_iters', '100000',
                   '--iters_per_print', '1', '--n_batch', '4']
    p = subprocess.Popen([sys.executable, 'train.py', *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    log = tmp_path / 's' / 'log.jsonl'
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and '"step": 3,' in log.read_text()):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    prefix, st = checkpoints.find_checkpoint(str(tmp_path / 's'))
    assert prefix is not None and st['step'] >= 4
    assert 'stopped by signal' in out
    assert (tmp_path / 's' / 'loss.png').exists()  # before the first epoch's evaluation: written at the stop


def _worker_pid(launcher_pid, rank):
    """Pid of the train.py process with RANK=rank started (at any depth) by launcher_pid."""
    parents = {}
    for d in os.listdir('/proc'):
        if d.isdigit():
            try:
                with open(f'/proc/{d}/stat') as f:
                    parents[int(d)] = int(f.read().rsplit(')', 1)[1].split()[1])
            except OSError:
                pass
    for pid in parents:
        up = pid
        while up in parents and up != launcher_pid:
            up = parents[up]
        if up != launcher_pid or pid == launcher_pid:
            continue
        try:
            env = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
            cmd = open(f'/proc/{pid}/cmdline', 'rb').read()
        except OSError:
            continue
        if f'RANK={rank}'.encode() in env and b'train.py' in cmd:
            return pid
    return None


def test_stop_signal_on_one_rank_stops_every_rank_at_the_same_step(fmnist_root, tmp_path):
    """SIGTERM to rank 1 alone: the ranks agree through the all-reduced stop vote (read one
    step late, without waiting for the step in flight), stop after the same step, write
    one complete checkpoint together and exit cleanly."""
    args = TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 'v', '--max_iters', '100000',
                   '--iters_per_print', '1', '--n_batch', '4', '--port', str(free_port())]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py', *args]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / 'v' / 'log.jsonl'
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and '"step": 3,' in log.read_text()):
        time.sleep(0.2)
    pid = _worker_pid(p.pid, 1)
    assert pid, 'rank 1 not found'
    os.kill(pid, signal.SIGTERM)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-3000:]
    prefix, st = checkpoints.find_checkpoint(str(tmp_path / 'v'))
    assert prefix is not None and st['step'] >= 4 and st['world_size'] == 2
    assert f'stopped by signal at step {st["step"]}' in out


def test_nan_and_huge_gradient_batches_are_skipped():
    import train
    import train_step
    from hps import get_hparams
    H = get_hparams(TINY + ['--skip_threshold', '400'])
    d = train.setup_distributed(device='cpu')
    model, ema = train_step.build_models(H, d)
    opt = train_step.make_optimizer(H, model, d.device)
    before = [p.detach().clone() for p in model.parameters()]
    ema_before = [p.detach().clone() for p in ema.parameters()]
    x = torch.randn(4, 28, 28, 1)
    xt = torch.rand(4, 28, 28, 1) * 2 - 1
    x_nan = x.clone()
    x_nan[0, 0, 0, 0] = float('nan')
    ctx = train_step.precision_context(H, d.device)
    st, _ = train_step.training_step(H, x_nan, xt, model, model, ema, opt, None, ctx, 1e-3, False)
    assert st['skipped_updates'] == 1 and st['distortion_nans'] + st['rate_nans'] >= 1
    H.skip_threshold = 1e-9  # every real gradient is now "huge"
    st, _ = train_step.training_step(H, x, xt, model, model, ema, opt, None, ctx, 1e-3, False)
    assert st['skipped_updates'] == 1 and st['grad_norm'] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, ema.parameters()))
    H.skip_threshold = 400
    st, _ = train_step.training_step(H, x, xt, model, model, ema, opt, None, ctx, 1e-3, False)
    assert st['skipped_updates'] == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _release_step(H, x_in, x_target, model, ema, optimizer, lr):
    """The training step as it was before the skip decision moved to the device (commit
    a1ebccf, one process, fp32): the host reads loss and grad norm, then decides."""
    for g in optimizer.param_groups:
        g['lr'] = lr
    optimizer.zero_grad(set_to_none=True)
    stats = model(x_in, x_target)
    stats['elbo'].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), H.grad_clip).item()
    nans = torch.isnan(stats['distortion']).item() or torch.isnan(stats['rate']).item()
    update = not nans and np.isfinite(grad_norm) and (H.skip_threshold == -1 or grad_norm < H.skip_threshold)
    if update:
        optimizer.step()
        rate = torch.as_tensor(H.ema_rate, dtype=torch.float32)
        with torch.no_grad():
            for p1, p2 in zip(model.parameters(), ema.parameters()):
                p2.mul_(rate)
                p2.add_(p1 * (1 - rate))
    return stats['elbo'].item(), grad_norm, 0 if update else 1


def _tiny_run_state(H):
    import train
    import train_step
    d = train.setup_distributed(device='cpu')
    model, ema = train_step.build_models(H, d)
    return model, ema, train_step.make_optimizer(H, model, d.device)


def test_device_side_step_equals_host_side_step():
    """train_step.training_step (skip decision on the device, masked fused AdamW and EMA) against
    the host-side step over seven batches: normal, NaN input, an input x300 (grad norm ~6e6:
    over skip_threshold), x1000 (infinite grad norm), x100 (grad norm ~150: clipped at
    grad_clip, applied).  Loss, grad norm, skip decisions, parameters, EMA and the optimizer
    state (moments and step counts) are bitwise equal after every step."""
    import train_step
    from hps import get_hparams
    H = get_hparams(TINY + ['--skip_threshold', '400', '--grad_clip', '100', '--ema_rate', '0.99'])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 28, 28, 1, generator=gen)
    xt = torch.rand(4, 28, 28, 1, generator=gen) * 2 - 1
    x_nan = x.clone()
    x_nan[1, 3, 4, 0] = float('nan')
    batches = [x, x_nan, x, 300 * x, 1000 * x, x, 100 * x]
    new, ref = _tiny_run_state(H), _tiny_run_state(H)
    ctx = train_step.precision_context(H, torch.device('cpu'))
    skips = []
    for i, xb in enumerate(batches):
        lr = train_step.learning_rate(H, i + 10)
        torch.manual_seed(i)
        st, stop = train_step.training_step(H, xb, xt, new[0], new[0], new[1], new[2], None, ctx, lr, False)
        torch.manual_seed(i)
        elbo, grad_norm, skipped = _release_step(H, xb, xt, ref[0], ref[1], ref[2], lr)
        assert st['elbo'].item() == elbo or (np.isnan(elbo) and st['elbo'].isnan())
        assert st['grad_norm'].item() == grad_norm or (np.isnan(grad_norm) and st['grad_norm'].isnan())
        assert st['skipped_updates'].item() == skipped and st['overflow_steps'].item() == 0 and stop.item() == 0
        skips.append(skipped)
        for a, b in zip(list(new[0].parameters()) + list(new[1].parameters()),
                        list(ref[0].parameters()) + list(ref[1].parameters())):
            assert torch.equal(a, b)
        for p, q in zip(new[0].parameters(), ref[0].parameters()):
            sa, sb = new[2].state[p], ref[2].state[q]
            assert all(torch.equal(sa[k], sb[k]) for k in ('exp_avg', 'exp_avg_sq', 'step'))
    assert skips == [0, 1, 0, 1, 1, 0, 0]
    assert new[2].state[next(new[0].parameters())]['step'].item() == 4


class _NoHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any device-to-host read of a tensor's value (.item(), bool(), .tolist())."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func is not torch.ops.aten._local_scalar_dense.default, 'the host read a value during the step'
        return func(*args, **(kwargs or {}))


def test_training_step_never_reads_the_device():
    """With the fused optimizer train.py uses, a training step, skipped or not, queues its
    work without the host waiting for a value (no per-step synchronisation on a GPU)."""
    import train_step
    from hps import get_hparams
    H = get_hparams(TINY + ['--skip_threshold', '400'])
    model, ema, opt = _tiny_run_state(H)
    x = torch.randn(4, 28, 28, 1)
    xt = torch.rand(4, 28, 28, 1) * 2 - 1
    ctx = train_step.precision_context(H, torch.device('cpu'))
    for xb in [x, 1000 * x]:
        with _NoHostReads():
            st, _ = train_step.training_step(H, xb, xt, model, model, ema, opt, None, ctx, 1e-3, False)
    assert st['skipped_updates'].item() == 1


def test_step_outcome_counts_overflow_apart():
    """The device-side rule: NaN losses and large or non-finite grad norms skip; a loss-scaler
    overflow with finite losses is an overflow step (not a skipped update)."""
    from train_step import step_outcome
    t = torch.tensor
    inf, nan = float('inf'), float('nan')
    cases = [  # nans, grad_norm, found_inf, threshold -> (update, skipped, overflow)
        (0., 5., None, 400, (1, 0, 0)), (0.5, 5., None, 400, (0, 1, 0)), (0., 400., None, 400, (0, 1, 0)),
        (0., 399., None, 400, (1, 0, 0)), (0., 1e9, None, -1, (1, 0, 0)), (0., inf, None, -1, (0, 1, 0)),
        (0., nan, None, 400, (0, 1, 0)), (0., inf, 1., 400, (0, 0, 1)), (0., nan, 1., -1, (0, 0, 1)),
        (1., nan, 1., 400, (0, 1, 0)), (0., 5., 0., 400, (1, 0, 0))]
    for nans, gn, found_inf, thr, want in cases:
        got = step_outcome(thr, t(nans), t(gn), None if found_inf is None else t(found_inf))
        assert tuple(int(v.item()) for v in got) == want, (nans, gn, found_inf, thr)


def test_overflow_steps_do_not_make_a_stall():
    """The stall warning counts consecutive skipped updates: fp16 overflow steps neither add
    to the streak nor end it; an applied update ends it."""
    from train_loop import skip_streak
    steps = [(1, 0), (0, 1), (0, 1), (1, 0), (0, 0), (0, 1), (1, 0)]  # (skipped, overflow)
    streak, streaks = 0, []
    for skipped, overflow in steps:
        streak = skip_streak(streak, skipped, overflow)
        streaks.append(streak)
    assert streaks == [1, 1, 1, 2, 0, 0, 1]


def test_loss_scaler_overflow_is_not_a_skipped_update():
    """fp16's GradScaler, exercised on the CPU in fp32: a step whose scaled gradients hold an
    inf (put there by a hook on one parameter, as an fp16 overflow would) is an overflow step
    (counted apart, nothing updated, the loss scale halved); the next step updates."""
    import train_step
    from hps import get_hparams
    H = get_hparams(TINY + ['--skip_threshold', '400'])
    model, ema, opt = _tiny_run_state(H)
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 10)
    before = [p.detach().clone() for p in list(model.parameters()) + list(ema.parameters())]
    x = torch.randn(4, 28, 28, 1)
    xt = torch.rand(4, 28, 28, 1) * 2 - 1
    ctx = train_step.precision_context(H, torch.device('cpu'))
    weight = model.decoder.out_net.out_conv.weight
    hook = weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float('inf')))
    st, _ = train_step.training_step(H, x, xt, model, model, ema, opt, scaler, ctx, 1e-3, False)
    hook.remove()
    assert (st['overflow_steps'].item(), st['skipped_updates'].item()) == (1, 0)
    assert np.isfinite(st['elbo'].item()) and scaler.get_scale() == 2. ** 9
    assert all(torch.equal(a, b) for a, b in zip(before, list(model.parameters()) + list(ema.parameters())))
    assert all(s['step'].item() == 0 for s in opt.state.values())
    st, _ = train_step.training_step(H, x, xt, model, model, ema, opt, scaler, ctx, 1e-3, False)
    assert (st['overflow_steps'].item(), st['skipped_updates'].item()) == (0, 0)
    assert all(s['step'].item() == 1 for s in opt.state.values())
    assert not torch.equal(before[0], next(model.parameters()))


def test_skipped_updates_are_counted_and_stalls_warned(fmnist_root, tmp_path):
    run(TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 'k', '--max_iters', '6',
                '--n_batch', '4', '--iters_per_print', '1', '--skip_threshold', '1e-9', '--warn_skipped', '5'])
    tl = [z for z in log_lines(tmp_path / 'k', 'train_loss') if 'lr' in z]
    assert [z['total_skipped'] for z in tl] == [1, 2, 3, 4, 5, 6]
    warnings = log_lines(tmp_path / 'k', 'warning')
    assert warnings and 'raise --skip_threshold' in warnings[0]['message']
    st = torch.load(tmp_path / 'k' / 'latest-model.th', weights_only=True)
    torch.manual_seed(0)  # the model never moved from its initialisation
    from hps import get_hparams
    from vae import VAE
    init = VAE(get_hparams(TINY)).state_dict()
    assert all(torch.equal(init[k], st[k]) for k in init)


def test_ema_matches_release_update():
    from train_step import update_ema
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    e = [torch.randn(5, 3) for _ in range(3)]
    m1, m2 = torch.nn.ParameterList(a), torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in e])
    update_ema(m1, m2, 0.9999)
    rate = torch.as_tensor(0.9999)  # the release keeps ema_rate as a float32 tensor
    for p1, p2 in zip(a, e):
        p2.mul_(rate)
        p2.add_(p1.data * (1 - rate))
    for p, q in zip(m2.parameters(), e):
        torch.testing.assert_close(p.data, q, rtol=0, atol=1e-7)


def test_warmup_zero_means_no_warmup():
    from hps import get_hparams
    from train_step import learning_rate
    H = get_hparams(TINY + ['--warmup_iters', '0', '--lr', '0.001'])
    assert learning_rate(H, 0) == 0.001
    H = get_hparams(TINY + ['--warmup_iters', '100', '--lr', '0.001'])
    assert learning_rate(H, 0) == 0 and learning_rate(H, 50) == 0.0005 and learning_rate(H, 500) == 0.001


class _Evil:
    def __reduce__(self):
        return (os.system, ('touch /tmp/vdvae_pwned_marker',))


@pytest.mark.parametrize('case', ['other_preset', 'truncated', 'code', 'missing', 'hps_typo', 'not_state_dict'])
def test_bad_input_gives_one_line_error_and_writes_nothing(fmnist_root, tmp_path, case):
    bad = tmp_path / 'bad.th'
    args = TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path / 'runs'), '--desc', 'x',
                   '--max_iters', '2']
    if case == 'other_preset':
        args += ['--restore_path', ref('tiny32', 'model.th')]
        expect = 'does not fit the model'
    elif case == 'truncated':
        data = open(ref('tiny32', 'model.th'), 'rb').read()
        bad.write_bytes(data[:len(data) // 2])
        args += ['--restore_path', str(bad)]
        expect = 'it is truncated: '
    elif case == 'code':
        with open(bad, 'wb') as f:
            torch.save({'x': _Evil()}, f)
        args += ['--restore_ema_path', str(bad)]
        expect = 'refusing to load'
    elif case == 'missing':
        args += ['--restore_optimizer_path', str(tmp_path / 'nope-opt.th')]
        expect = 'no such file'
    elif case == 'hps_typo':
        args = ['--hps', 'cifar1O', '--save_dir', str(tmp_path / 'runs')]
        expect = "unknown preset 'cifar1O'"
    else:
        torch.save([torch.zeros(3)], bad)
        args += ['--restore_path', str(bad)]
        expect = 'is not a model state dict'
    if os.path.exists('/tmp/vdvae_pwned_marker'):
        os.remove('/tmp/vdvae_pwned_marker')
    p = run(args, check=False)
    assert p.returncode == 2, p.stderr
    assert expect in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 or case == 'other_preset'  # that one lists the differences
    assert 'Traceback' not in p.stderr
    assert not os.path.exists(tmp_path / 'runs' / 'x') or not os.listdir(tmp_path / 'runs' / 'x')
    assert not os.path.exists('/tmp/vdvae_pwned_marker')


def test_mismatch_message_names_preset_and_block_override(tmp_path):
    """A cifar10 checkpoint with two encoder blocks missing (like the released ffhq1024
    files) is recognised and the message says how to override the block string."""
    from hps import preset
    from checkpoints import describe_mismatch
    from vae import VAE
    H = preset('cifar10')
    with torch.device('meta'):
        model = VAE(H)
    sd = model.state_dict()
    msg = describe_mismatch(model, sd, 'x.th', preset('imagenet32'))
    assert "'cifar10' preset" in msg and '--hps cifar10' in msg
    n = 1 + max(int(k.split('.')[2]) for k in sd if k.startswith('encoder.enc_blocks.'))
    trimmed = {k: v for k, v in sd.items()
               if not (k.startswith(f'encoder.enc_blocks.{n - 1}.') or k.startswith(f'encoder.enc_blocks.{n - 2}.'))}
    msg = describe_mismatch(model, trimmed, 'x.th', H)
    assert f'The file has {n - 2} encoder blocks' in msg and f'builds {n}' in msg and '--enc_blocks' in msg
    assert f'encoder.enc_blocks.{n - 2}.c1.weight' in msg


def test_cuda_graphs_flag_refused_on_cpu(fmnist_root, tmp_path):
    p = run(TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 'g', '--cuda_graphs',
                    '--device', 'cpu', '--max_iters', '2'], check=False)
    assert p.returncode == 2 and 'error: --cuda_graphs needs a CUDA GPU' in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / 'g') or not os.listdir(tmp_path / 'g')


def test_log_window_counts_are_integers_summed_over_the_window():
    """Skipped updates, NaN flags and fp16 overflow steps are counts of the print window."""
    from train_loop import accumulate_stats
    rows = [dict(elbo=3.0, distortion=2.5, rate=0.5, distortion_nans=0., rate_nans=0., grad_norm=g,
                 skipped_updates=s, overflow_steps=o, iter_time=0.1)
            for g, s, o in [(1.0, 0., 1.), (5.0, 1., 0.), (2.0, 0., 1.)]]
    z = accumulate_stats(rows, 3)
    assert (z['skipped_updates'], z['overflow_steps']) == (1, 2) and type(z['overflow_steps']) is int
    assert z['grad_norm'] == 5.0 and z['elbo_bpd'] == pytest.approx(3.0 / np.log(2))

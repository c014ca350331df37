"""Every entry point on a GPU: train.py in fp32/bf16/fp16, with --channels_last,
--grad_checkpoint and --cuda_graphs (with data-loading workers, after a resume and after the
release bundle's restore), launched by python, torchrun (NCCL) and mpiexec; resume after
SIGTERM; the release bundle restored, continued and tested with the same test ELBO as on the
CPU; DDP on the GPU a process was given; sample.py; every evaluate.py mode; one bench.py line
with --cuda_graphs; and the device-side pieces (keyed noise bits, fused AdamW state layout).
``--compile`` (both scopes) is marked ``slow`` as well: an optional run of its own
(``./run_gpu_tests.sh --compile``), since a cold inductor build takes minutes.

Marked ``cuda`` and skipped without a GPU.  Run them with ``./run_gpu_tests.sh`` (tiny models,
few steps, about 15 processes: an estimated 3 minutes on one H100 from a cold start, not yet
timed).  ``VDVAE_TEST_DEVICE=cpu`` runs the same commands on the CPU instead (fp16,
--cuda_graphs and the GPU-only checks left out), to check the commands on a machine without a
GPU.  tests/test_cuda_step.py holds the in-process GPU checks that each feature is really on.

Needs only torch, numpy, pytest, tqdm, matplotlib (and its Pillow) and, for the mpiexec
case, mpi4py: the data are synthetic fashion_mnist and imagenet32 files written here (no
scikit-learn, which only cifar10's split needs).
"""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = os.environ.get('VDVAE_TEST_DEVICE', 'cuda')
ON_GPU = DEVICE == 'cuda'
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason='no CUDA device')]
gpu_only = pytest.mark.skipif(not ON_GPU, reason='needs a GPU (VDVAE_TEST_DEVICE=cpu)')

TINY = ['--hps', 'fashion_mnist', '--width', '16', '--zdim', '2', '--num_mixtures', '2',
        '--enc_blocks', '28x1,28d2,14x1,14d2,7x1,7d7,1x1', '--dec_blocks', '1x1,7m1,14m7,28m14',
        '--no_progress', '--num_workers', '0', '--n_batch', '8', '--n_batch_eval', '32', '--valid_images', '64',
        '--iters_per_print', '1', '--iters_per_images', '100000']
# the release bundle's architecture (tests/reference/tiny32), on imagenet32-format files
TINY32 = ['--hps', 'imagenet32', '--width', '32', '--zdim', '4', '--num_mixtures', '3',
          '--enc_blocks', '32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x2',
          '--dec_blocks', '1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2', '--no_progress', '--num_workers', '0',
          '--n_batch', '4', '--n_batch_eval', '32', '--valid_images', '32', '--iters_per_images', '100000']


# ----------------------------------------------------------------------------- data and runs

def _write_idx(path, images):
    n, h, w = images.shape
    with gzip.open(path, 'wb', compresslevel=1) as f:
        f.write(np.array([2051, n, h, w], dtype='>i4').tobytes() + images.astype(np.uint8).tobytes())


def synthetic_data():
    """fashion_mnist (5200 train: 5000 go to valid) and imagenet32 (5100 train, 48 test) images."""
    rng = np.random.RandomState(0)
    base = rng.randint(0, 256, (8, 28, 28))
    fm = base[rng.randint(0, 8, 5200)] // 2 + rng.randint(0, 128, (5200, 28, 28))
    return dict(fashion_mnist=fm, imagenet32_train=rng.randint(0, 256, (5100, 32, 32, 3)).astype(np.uint8),
                imagenet32_test=rng.randint(0, 256, (48, 32, 32, 3)).astype(np.uint8))


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """The synthetic data as files: fashion_mnist (5200 train; 64 test) and imagenet32 (5100 train; 48 test)."""
    root = tmp_path_factory.mktemp('data')
    images = synthetic_data()
    os.makedirs(root / 'fashion_mnist')
    _write_idx(root / 'fashion_mnist' / 'train-images-idx3-ubyte.gz', images['fashion_mnist'])
    _write_idx(root / 'fashion_mnist' / 't10k-images-idx3-ubyte.gz', images['fashion_mnist'][:64])
    np.save(root / 'imagenet32-train.npy', images['imagenet32_train'])
    np.save(root / 'imagenet32-valid.npy', images['imagenet32_test'])
    return str(root)


def _mpiexec():
    exe = shutil.which('mpiexec', path=os.path.dirname(sys.executable)) or shutil.which('mpiexec')
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return exe


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(script, args, launcher=(), timeout=300, check=True):
    """Run an entry point on DEVICE; returns the CompletedProcess."""
    if launcher and launcher[0] == 'torchrun':
        cmd = [sys.executable, '-m', 'torch.distributed.run', *launcher[1:], script]
    else:
        cmd = [*launcher, sys.executable, script]
    cmd += [*args, '--device', DEVICE] + (['--threads', '2'] if not ON_GPU else [])
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f'{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    return p


def log_lines(run_dir, kind=None, name='log.jsonl'):
    lines = [json.loads(x) for x in open(os.path.join(run_dir, name))]
    return [z for z in lines if kind is None or z.get('type') == kind]


def check_run(run_dir, steps):
    """A finished run: one train_loss per step with finite numbers, a finite valid ELBO with
    its standard error, the sample grid after the first update and the latest checkpoint."""
    tl = {z['step']: z for z in log_lines(run_dir, 'train_loss') if 'lr' in z}
    assert sorted(tl) == list(range(steps))
    assert all(np.isfinite(z['elbo']) and np.isfinite(z['grad_norm']) for z in tl.values())
    ev = log_lines(run_dir, 'eval_loss')[-1]
    assert np.isfinite(ev['elbo']) and ev['elbo_se'] > 0
    for f in ['samples-1.png', 'loss.png', 'latest-model.th', 'latest-opt.th', 'latest-state.th']:
        assert os.path.exists(os.path.join(run_dir, f)), f
    info = next(z['message'] for z in log_lines(run_dir) if 'process(es) via' in z.get('message', ''))
    assert f'device {DEVICE}' in info, info
    return tl, ev


# ----------------------------------------------------------------------------- train.py

TRAIN_CASES = {  # name: (flags, launcher); fp32 with python: the ``trained`` run below
    'bf16-channels_last': (['--precision', 'bf16', '--channels_last'], ()),
    'fp16-grad_checkpoint': (['--precision', 'fp16', '--grad_checkpoint'], ()),
    'torchrun-nccl': ([], ('torchrun', '--standalone', '--nproc_per_node', '1')),
    'mpiexec': ([], ('mpiexec', '-n', '1')),
}
COMPILE_CASES = {  # the optional run (marker slow)
    'bf16-compile-model': ['--precision', 'bf16', '--compile', '--compile_scope', 'model'],
    'bf16-compile-blocks': ['--precision', 'bf16', '--compile', '--compile_scope', 'blocks', '--channels_last'],
}


def _train_case(root, tmp_path, case, flags, launcher=()):
    if 'fp16' in flags and not ON_GPU:
        pytest.skip('fp16 needs a GPU')
    if '--compile' in flags and not ON_GPU:  # torch 2.13's CPU inductor fails on bf16 backward (avg-pool scatter)
        flags = ['fp32' if f == 'bf16' else f for f in flags]
    if launcher and launcher[0] == 'mpiexec':
        exe = _mpiexec()
        if exe is None:
            pytest.skip('mpiexec or mpi4py not found')
        launcher = (exe,) + launcher[1:]
    run('train.py', TINY + flags + ['--data_root', root, '--save_dir', str(tmp_path), '--desc', case,
                                    '--max_iters', '4', '--port', str(_free_port())], launcher=launcher)
    check_run(str(tmp_path / case), 4)
    via = 'torchrun' if case.startswith('torchrun') else 'mpiexec' if case == 'mpiexec' else 'single'
    assert any(f'1 process(es) via {via} ' in z.get('message', '') for z in log_lines(tmp_path / case))


@pytest.mark.parametrize('case', list(TRAIN_CASES))
def test_train(root, tmp_path, case):
    _train_case(root, tmp_path, case, *TRAIN_CASES[case])


@pytest.mark.slow
@pytest.mark.parametrize('case', list(COMPILE_CASES))
def test_train_compiled(root, tmp_path, case):
    _train_case(root, tmp_path, case, COMPILE_CASES[case])


def test_train_fp32(trained):
    check_run(os.path.join(trained, 'tiny'), 6)


def _graphed(run_dir, first_step, last_step):
    """--cuda_graphs in a run's log: the step captured after 3 eager ones, replays counted after."""
    captured = [z['step'] for z in log_lines(run_dir, 'cuda_graph')]
    assert captured[-1] == first_step + 3, captured
    replays = {z['step']: z['graph_replays'] for z in log_lines(run_dir, 'train_loss') if 'lr' in z}
    assert replays[last_step] == last_step - first_step - 2, replays
    return captured


GRAPHS = ['--cuda_graphs', '--num_workers', '2'] if ON_GPU else ['--num_workers', '2']  # workers pin batches meanwhile


def test_sigterm_then_resume(root, tmp_path):
    """SIGTERM mid-run writes latest and exits 0; the same command continues to the end.  With
    --cuda_graphs and two data-loading workers: the step is captured while the pin-memory thread
    works, and again after the resume, whose optimizer state then feeds the graph."""
    steps = 200 if ON_GPU else 40  # a GPU may take 40 tiny steps before the signal lands
    args = TINY + GRAPHS + ['--data_root', root, '--save_dir', str(tmp_path), '--desc', 's', '--max_iters',
                            str(steps), '--device', DEVICE]
    p = subprocess.Popen([sys.executable, 'train.py', *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    log = tmp_path / 's' / 'log.jsonl'
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and '"step": 3,' in log.read_text()) and p.poll() is None:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    st = torch.load(tmp_path / 's' / 'latest-state.th', weights_only=True)
    assert 4 <= st['step'] < steps, 'the run should have been stopped by the signal'
    p = run('train.py', args[:-2])
    assert 'resuming from' in p.stdout
    check_run(str(tmp_path / 's'), steps)
    if ON_GPU:
        assert len(_graphed(tmp_path / 's', st['step'], steps - 1)) == 2  # one capture per start


# ----------------------------------------------------------------------------- the release bundle

# GPU against CPU, relative, for the test ELBO's parts (means over the 48 images): ten times the
# fp32 rounding floor measured on the CPU by tests/test_model.py::test_gpu_tolerances_sit_above_the_fp32_floor
# (this bundle's EMA model on these images with its keyed noise, in float32 against float64: elbo 2.9e-7,
# distortion 2.9e-7, rate 2.5e-5 on 2026-12-01, torch 2.13.0).  Both devices round; cuDNN's convolution
# algorithms may round more than the CPU's, hence ten, not two.
GPU_VS_CPU_REL = dict(elbo=3e-6, distortion=3e-6, rate=2.5e-4)
# The keyed normals on the GPU against the CPU: ten times the float32 floor of the CPU's own normals
# against a float64 Box-Muller of the same float32 uniforms (|error| <= 2e-7 |z|, measured the same way).
KEYED_NORMAL_TOL = dict(rtol=2e-6, atol=1e-6)


def test_release_bundle_restore_continue_and_test_elbo_as_on_the_cpu(root, tmp_path):
    """The release's restore flags on its bundle (an apex FusedAdam optimizer file), then 6 steps
    (with --cuda_graphs: 3 eager, the capture, 2 replays), then --test_eval on this device and on
    the CPU: the same test ELBO to GPU_VS_CPU_REL."""
    b = ref('tiny32', 'tiny32-iter-10-')
    restore = ['--restore_path', b + 'model.th', '--restore_ema_path', b + 'model-ema.th',
               '--restore_optimizer_path', b + 'opt.th', '--restore_log_path', b + 'log.jsonl']
    p = run('train.py', TINY32 + restore + GRAPHS + ['--data_root', root, '--save_dir', str(tmp_path), '--desc', 'r',
                                                     '--max_iters', '16', '--iters_per_print', '1', '--channels_last'])
    assert 'starting at epoch 2, step 10' in p.stdout
    assert sorted(z['step'] for z in log_lines(tmp_path / 'r', 'train_loss') if 'lr' in z) == list(range(10, 16))
    if ON_GPU:
        _graphed(tmp_path / 'r', 10, 15)
    # the test ELBO of the released EMA weights: the same number on this device as on the CPU
    test = {}
    for dev in dict.fromkeys([DEVICE, 'cpu']):
        cmd = [sys.executable, 'train.py', *TINY32, '--data_root', root, '--save_dir', str(tmp_path),
               '--desc', f't-{dev}', '--test_eval', '--restore_ema_path', b + 'model-ema.th', '--device', dev,
               '--n_batch_eval', '16' if dev == 'cpu' else '48']
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        test[dev] = log_lines(tmp_path / f't-{dev}', 'test_loss')[-1]
        assert test[dev]['n_images'] == 48 and 'test elbo over 48 images' in p.stdout
    for k in ('elbo', 'distortion', 'rate'):
        assert test[DEVICE][k] == pytest.approx(test['cpu'][k], rel=GPU_VS_CPU_REL[k], abs=0), k


# ----------------------------------------------------------------------------- sample.py, evaluate.py, bench.py

@pytest.fixture(scope='module')
def trained(root, tmp_path_factory):
    """A run folder with checkpoints of the tiny fashion_mnist model, trained here."""
    save = tmp_path_factory.mktemp('runs')
    run('train.py', TINY + ['--data_root', root, '--save_dir', str(save), '--desc', 'tiny', '--max_iters', '6'])
    return str(save)


def test_sample_every_mode(root, trained, tmp_path):
    """The grid, unconditional samples and reconstructions, one launch (sample.main called in one process)."""
    common = ['--hps', 'fashion_mnist', '--data_root', root, '--save_dir', trained, '--desc', 'tiny',
              '--device', DEVICE]
    modes = {'grid': [], 'uncond': ['--n', '4', '--temperatures', '1.0,0.8'], 'recon': ['--indices', '0,1,2']}
    driver = tmp_path / 'driver.py'
    driver.write_text(f'import sys; sys.path.insert(0, {ROOT!r})\nimport sample\n' + ''.join(
        f'sample.main({common + ["--mode", m, "--out", str(tmp_path / f"{m}.png")] + flags!r})\n'
        for m, flags in modes.items()))
    p = subprocess.run([sys.executable, str(driver)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert all((tmp_path / f'{m}.png').exists() for m in modes) and p.stdout.count('wrote') == 3


EVAL_MODES = {'n_importance': ['--n_importance', '8', '--iw_batch', '16'], 'kl_stats': ['--kl_stats'],
              'encode': ['--encode', '--encode_what', 'both'], 'reconstruct': ['--reconstruct', '--indices', '0', '1'],
              'interpolate': ['--interpolate', '--indices', '0', '1', '--interp_steps', '3']}


def test_evaluate_every_mode(root, trained, tmp_path):
    """All five modes, one launch (evaluate.main called in one process)."""
    common = ['--hps', 'fashion_mnist', '--data_root', root, '--save_dir', trained, '--desc', 'tiny',
              '--n_images', '24', '--no_progress', '--num_workers', '0', '--device', DEVICE]
    driver = tmp_path / 'driver.py'
    driver.write_text(f'import json, sys; sys.path.insert(0, {ROOT!r})\nimport evaluate\nout = {{}}\n' + ''.join(
        f'out[{m!r}] = evaluate.main({common + ["--out_dir", str(tmp_path / m)] + flags!r})\n'
        for m, flags in EVAL_MODES.items()) + f'json.dump(out, open({str(tmp_path / "out.json")!r}, "w"))\n')
    p = subprocess.run([sys.executable, str(driver)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.load(open(tmp_path / 'out.json'))
    iw = out['n_importance']
    assert iw['n_images'] == 24 and np.isfinite(iw['iw_nll_nats_per_dim']) and iw['iw_nll_nats_per_dim_stderr'] > 0
    assert iw['iw_nll_nats_per_dim'] <= iw['elbo_nats_per_dim'] + 1e-6
    assert out['kl_stats']['n_images'] == 24 and out['kl_stats']['elbo_nats_per_dim_stderr'] > 0
    with np.load(out['encode']['path']) as z:
        assert z['z_3'].shape == (24, 2, 28, 28)
    assert os.path.exists(out['reconstruct']['png']) and os.path.exists(out['interpolate']['png'])


def test_bench_one_line(tmp_path):
    """With --cuda_graphs the warm-up runs past the capture (5 steps whatever --warmup says)."""
    out = tmp_path / 'bench.json'
    p = run('bench.py', ['--tiny', '--steps', '3', '--warmup', '2', '--eval_steps', '1', '--sample_steps', '1',
                         '--json', str(out)] + (['--cuda_graphs'] if ON_GPU else []))
    r = json.loads(out.read_text())
    row = r['results'][0]
    assert r['device'].startswith(DEVICE) and row['train_steps_per_s'] > 0 and np.isfinite(row['last_elbo']), p.stdout
    assert row['warmup_steps'] == (5 if ON_GPU else 2)


def test_ddp_computes_on_the_gpu_the_process_was_given(tmp_path):
    """DDP gets the device the process uses, not its local rank: local rank 3 of a node where
    each process sees one GPU (CUDA_VISIBLE_DEVICES=0, as per-rank launchers set it) trains on
    cuda:0 (device_ids=[3] failed with "invalid device ordinal").  A one-process group stands in
    for the node's others."""
    driver = tmp_path / 'ddp.py'
    driver.write_text(f"""import os, sys; sys.path.insert(0, {ROOT!r})
import torch, torch.distributed as dist
import train_step, utils
from hps import get_hparams
cuda = {ON_GPU!r}
device = utils.cuda_device(3) if cuda else torch.device('cpu')
if cuda:
    torch.cuda.set_device(device)
dist.init_process_group('nccl' if cuda else 'gloo', init_method='tcp://127.0.0.1:{_free_port()}', rank=0,
                        world_size=1, **({{'device_id': device}} if cuda else {{}}))
d = utils.Dist(rank=0, world_size=2, local_rank=3, device=device, launcher='torchrun')
H = get_hparams({TINY!r} + ['--device', {DEVICE!r}])
model, ema = train_step.build_models(H, d)
net = train_step.wrap_for_training(H, model, d)
assert isinstance(net, torch.nn.parallel.DistributedDataParallel) and net.device_ids == ([0] if cuda else None)
opt = train_step.make_optimizer(H, model, device)
step = train_step.EagerStep(H, net, model, ema, opt, None, train_step.precision_context(H, device))
x = torch.randint(0, 256, (8, 28, 28, 1), dtype=torch.uint8, device=device)
print('elbo', float(step(x, 1e-3)[0]['elbo']))
dist.destroy_process_group()
""")
    p = subprocess.run([sys.executable, str(driver)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES='0') if ON_GPU else None)
    assert p.returncode == 0, p.stderr[-3000:]
    assert np.isfinite(float(p.stdout.split('elbo')[-1]))


# ----------------------------------------------------------------------------- device-side pieces

@gpu_only
def test_keyed_noise_is_the_same_on_the_gpu():
    """Philox words bit for bit, normals to float32 rounding of log/sqrt/cos/sin (KEYED_NORMAL_TOL)."""
    from vae_helpers import KeyedNormal, philox4x32
    g, img = torch.arange(5000), torch.arange(3)[:, None]
    counter = (g, torch.full((1,), 7), img, torch.zeros_like(img))
    on_cpu = philox4x32(counter, (123, 0))
    on_gpu = philox4x32(tuple(c.cuda() for c in counter), (123, 0))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(on_cpu, on_gpu))
    a = KeyedNormal(5, torch.arange(40)).normal(3, (4, 16, 16))
    b = KeyedNormal(5, torch.arange(40, device='cuda')).normal(3, (4, 16, 16))
    assert b.device.type == 'cuda'
    torch.testing.assert_close(b.cpu(), a, **KEYED_NORMAL_TOL)


@gpu_only
def test_fused_adamw_on_the_gpu_after_loading_the_other_layout_and_an_apex_file(tmp_path):
    """The fused CUDA kernel refuses state whose layout differs from its parameter's; an apex
    file must leave the optimizer fused with its step tensors on the GPU."""
    import checkpoints
    import train_step
    from conftest import load_tiny
    H, model, _, _, _ = load_tiny()
    dev = torch.device('cuda')
    model.to(dev).train()
    opt = train_step.make_optimizer(H, model, dev)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / 'opt.th')
    model.set_channels_last(True)
    for src in (str(tmp_path / 'opt.th'), ref('tiny32', 'apex_opt.th')):
        opt = train_step.make_optimizer(H, model, dev)
        checkpoints.load_optimizer_file(opt, src)
        assert all(g['fused'] for g in opt.param_groups)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
            st = opt.state[p]
            assert st['step'].device.type == 'cuda' and st['exp_avg'].stride() == p.stride()
        opt.step()
        torch.cuda.synchronize()

"""Work is never lost: a crash between the renames of a checkpoint save, a damaged
checkpoint, a signal to the whole process group (python, torchrun, mpiexec), temporaries
of killed processes, resuming with changed hyperparameters, and the loss plot's points."""
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

import checkpoints

from test_train import ROOT, TINY, fmnist_root, log_lines, run, state_dict, train_losses  # noqa: F401 (fixture)

KILL_AFTER_RENAME = os.path.join(ROOT, 'tests', 'kill_after_rename')

COMMON = TINY + ['--iters_per_print', '1', '--n_batch', '4', '--warmup_iters', '3', '--lr', '0.003',
                 '--iters_per_save', '2']


def args(root, save_dir, desc, max_iters, *extra):
    return COMMON + ['--data_root', root, '--save_dir', str(save_dir), '--desc', desc,
                     '--max_iters', str(max_iters), *extra]


def folder_bytes(run_dir):
    """{name: bytes} of every file in a run folder (recursively)."""
    out = {}
    for base, _, files in os.walk(run_dir):
        for f in files:
            path = os.path.join(base, f)
            out[os.path.relpath(path, run_dir)] = open(path, 'rb').read()
    return out


@pytest.fixture(scope='module')
def uninterrupted(fmnist_root, tmp_path_factory):
    """8 steps without interruption: per-step losses and the final model."""
    save_dir = tmp_path_factory.mktemp('full')
    run(args(fmnist_root, save_dir, 'full', 8))
    return train_losses(save_dir / 'full'), state_dict(save_dir / 'full' / 'latest-model.th')


def assert_continues_exactly(run_dir, uninterrupted):
    full, model = uninterrupted
    losses = train_losses(run_dir)  # a step logged twice keeps its last (resumed) value
    assert sorted(losses) == list(range(8))
    assert [losses[i] for i in range(8)] == [full[i] for i in range(8)]  # bit-for-bit
    resumed = state_dict(run_dir / 'latest-model.th')
    assert all(torch.equal(model[k], resumed[k]) for k in model)


# ----------------------------------------------------------------------------- damaged checkpoints

def test_kill_between_renames_of_a_save_resumes_from_the_previous_set(fmnist_root, tmp_path, uninterrupted):
    """SIGKILL right after latest-opt.th of the step-6 save was renamed into place: latest
    is a mix of steps 6 and 4.  The same command continues from `previous` (step 4)."""
    a = args(fmnist_root, tmp_path, 'crash', 8)
    # the kill after the rename, patched into os.replace at start-up (tests/kill_after_rename/sitecustomize.py)
    path = os.pathsep.join(filter(None, [KILL_AFTER_RENAME, os.environ.get('PYTHONPATH')]))
    kill = {'PYTHONPATH': path, 'KILL_AFTER_RENAME': 'latest-opt.th:3'}
    p = run(a, check=False, env=kill)  # saves at 2, 4, 6
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    rd = tmp_path / 'crash'
    assert torch.load(rd / 'latest-state.th', weights_only=True)['step'] == 4  # torn: state still of step 4
    p = run(a)
    assert 'ignoring incomplete checkpoint' in p.stdout
    assert f'resuming from {rd / "previous"} (step 4' in p.stdout
    assert_continues_exactly(rd, uninterrupted)


def test_truncated_optimizer_file_falls_back_to_the_previous_set(fmnist_root, tmp_path, uninterrupted):
    """`truncate` of latest-opt.th (model and EMA intact) must not restart from zero."""
    run(args(fmnist_root, tmp_path, 't', 6))
    rd = tmp_path / 't'
    opt = rd / 'latest-opt.th'
    os.truncate(opt, os.path.getsize(opt) // 2)
    p = run(args(fmnist_root, tmp_path, 't', 8))
    assert 'resuming from' in p.stdout and '(step 4' in p.stdout
    assert_continues_exactly(rd, uninterrupted)
    # the loss plot's points: one per step, the resumed values, up to the final save at step 8
    import pictures
    from utils import read_log
    tr, va = pictures.loss_curves(read_log(rd / 'log.jsonl'))
    assert [s for s, _ in tr] == list(range(9))
    full, _ = uninterrupted
    assert [v for s, v in tr[:8]] == [full[s] / np.log(2) for s in range(8)]
    assert [s for s, _ in va] == [6, 8]


def test_no_complete_checkpoint_refuses_to_start_and_restart_sets_old_files_aside(fmnist_root, tmp_path):
    run(args(fmnist_root, tmp_path, 'one', 2))  # a single checkpoint generation
    rd = tmp_path / 'one'
    opt = rd / 'latest-opt.th'
    os.truncate(opt, os.path.getsize(opt) // 2)
    before = folder_bytes(rd)
    p = run(args(fmnist_root, tmp_path, 'one', 4), check=False)
    assert p.returncode == 2 and 'no complete set' in p.stderr and '--restart' in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and 'Traceback' not in p.stderr
    assert folder_bytes(rd) == before  # nothing written, nothing removed
    p = run(args(fmnist_root, tmp_path, 'one', 4, '--restart'))
    assert 'resuming' not in p.stdout and 'moved the earlier files' in p.stdout
    aside = [f for f in os.listdir(rd) if f.startswith('before-restart-')]
    assert len(aside) == 1
    assert folder_bytes(rd / aside[0]) == before  # every old file kept, byte for byte
    assert sorted(train_losses(rd)) == [0, 1, 2, 3]
    assert torch.load(rd / 'latest-state.th', weights_only=True)['step'] == 4


def test_previous_generation_is_the_last_complete_latest(fmnist_root, tmp_path):
    """Each save of latest first makes the complete latest set `previous` (links, no
    temporaries left, also when repeated); a torn latest never becomes `previous`."""
    import train
    import train_step
    from utils import logger
    H, d, _ = train.set_up(TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 'p'])
    os.makedirs(H.run_dir)
    log = logger(os.path.join(H.run_dir, 'log'))
    model, ema = train_step.build_models(H, d)
    opt = train_step.make_optimizer(H, model, d.device)
    for step in (1, 2):
        checkpoints.save_checkpoint(H, d, 'latest', model, ema, opt, None, log,
                                    checkpoints.Progress(step=step, epoch=0, batch=step))
    assert checkpoints.checkpoint_state(os.path.join(H.run_dir, 'previous'))['step'] == 1
    checkpoints.keep_previous(H.run_dir)
    checkpoints.keep_previous(H.run_dir)  # again, before latest changed
    assert checkpoints.checkpoint_state(os.path.join(H.run_dir, 'previous'))['step'] == 2
    assert not [f for f in os.listdir(H.run_dir) if '.tmp.' in f]
    torn = os.path.join(H.run_dir, 'latest-model.th')
    with open(torn + '.new', 'wb') as f:
        f.write(b'not the model the state file describes')
    os.replace(torn + '.new', torn)  # a torn latest (replaced, as a save does; previous keeps its own file)
    checkpoints.save_checkpoint(H, d, 'latest', model, ema, opt, None, log, checkpoints.Progress(step=3, epoch=0,
                                                                                             batch=3))
    assert checkpoints.checkpoint_state(os.path.join(H.run_dir, 'previous'))['step'] == 2
    assert checkpoints.find_checkpoint(H.run_dir)[1]['step'] == 3


def test_stale_temporaries_of_killed_processes_are_removed(fmnist_root, tmp_path):
    run(args(fmnist_root, tmp_path, 'tmp', 2))
    rd = tmp_path / 'tmp'
    dead = subprocess.Popen(['true'])
    dead.wait()  # a PID that no longer runs
    stale = rd / f'latest-model.th.tmp.{dead.pid}'
    live = rd / f'latest-opt.th.tmp.{os.getpid()}'  # a live writer's temporary stays
    stale.write_bytes(b'x' * 1000)
    live.write_bytes(b'y')
    p = run(args(fmnist_root, tmp_path, 'tmp', 3))
    assert not stale.exists() and live.exists()
    assert stale.name in p.stdout


# ----------------------------------------------------------------------------- changed hyperparameters

def test_changed_hyperparameters_are_logged_refused_or_allowed(fmnist_root, tmp_path):
    run(args(fmnist_root, tmp_path, 'h', 2))
    rd = tmp_path / 'h'
    before = folder_bytes(rd)
    # breaks exact resume: refused with one line naming the key and the flag; nothing touched
    p = run(args(fmnist_root, tmp_path, 'h', 4, '--n_batch', '8', '--lr', '0.01'), check=False)
    assert p.returncode == 2 and '--allow_changes' in p.stderr
    named = p.stderr.split('with changed ', 1)[1].split(' would not', 1)[0]  # only the breaking change is named
    assert named == 'global batch (--n_batch 4 x 1 process = 4 -> --n_batch 8 x 1 process = 8 images per update)'

    assert len(p.stderr.strip().splitlines()) == 1
    assert folder_bytes(rd) == before
    # an architecture change is refused before anything is loaded or logged
    p = run(args(fmnist_root, tmp_path, 'h', 4, '--width', '8'), check=False)
    assert p.returncode == 2 and 'width' in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert folder_bytes(rd) == before
    # optimisation settings may change: logged old -> new, history kept
    p = run(args(fmnist_root, tmp_path, 'h', 4, '--lr', '0.01', '--ema_rate', '0.5'))
    assert 'lr 0.003 -> 0.01' in p.stdout and 'ema_rate 0.9999 -> 0.5' in p.stdout
    assert json.load(open(rd / 'hparams.json'))['lr'] == 0.003  # the run's first configuration
    history = [json.loads(x) for x in open(rd / 'hparams.jsonl')]
    assert [h['step'] for h in history] == [0, 2]
    assert history[1]['changed'] == {'ema_rate': [0.9999, 0.5], 'lr': [0.003, 0.01], 'max_iters': [2, 4]}
    assert history[1]['H']['lr'] == 0.01 and history[0]['changed'] == {}
    # confirmed batch-size change: the position in the epoch is kept in images (4 x 4 = 2 x 8)
    p = run(args(fmnist_root, tmp_path, 'h', 6, '--lr', '0.01', '--ema_rate', '0.5', '--n_batch', '8',
                 '--allow_changes'))
    assert 'n_batch 4 -> 8' in p.stdout and 'continuing at global batch 2 of 25 of this epoch' in p.stdout
    st = torch.load(rd / 'latest-state.th', weights_only=True)
    assert st['step'] == 6 and st['epoch'] == 0 and st['batch'] == 4


def test_resume_across_process_counts_keeps_the_global_batch(fmnist_root, tmp_path, uninterrupted):
    """1 process x 4 images -> 2 processes x 2 -> 1 process x 4: the same global batch, so each
    resume is accepted and continues the uninterrupted run (the same images, and with
    --rank_invariant_noise the same noise stream, to float tolerance); a different global
    batch (1 x 2 after 2 x 2: the per-process batch kept, the update halved) is refused."""
    full, _ = uninterrupted
    rd = tmp_path / 'g'
    run(args(fmnist_root, tmp_path, 'g', 2))
    p = run(args(fmnist_root, tmp_path, 'g', 4, '--n_batch', '2', '--rank_invariant_noise'),
            launcher=['torchrun', '--standalone', '--nproc_per_node', '2'])
    assert f'resuming from {rd / "latest"} (step 2' in p.stdout and 'noise continue' in p.stdout
    assert torch.load(rd / 'latest-state.th', weights_only=True)['world_size'] == 2
    before = folder_bytes(rd)
    p = run(args(fmnist_root, tmp_path, 'g', 6, '--n_batch', '2'), check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert 'changed global batch (--n_batch 2 x 2 processes = 4 -> --n_batch 2 x 1 process = 2 images' in p.stderr
    assert '--allow_changes' in p.stderr and folder_bytes(rd) == before
    run(args(fmnist_root, tmp_path, 'g', 6))  # one process: its one stream is the global one
    losses = train_losses(rd)
    assert sorted(losses) == list(range(6))
    np.testing.assert_allclose([losses[i] for i in range(6)], [full[i] for i in range(6)], rtol=1e-5)
    st = torch.load(rd / 'latest-state.th', weights_only=True)
    assert (st['step'], st['epoch'], st['batch'], st['world_size']) == (6, 0, 6, 1)


def test_resumed_run_redraws_no_earlier_grid_and_says_how_many_steps_a_window_holds(fmnist_root, tmp_path):
    """samples-N.png is the EMA model after N updates, drawn at the run's early steps and every
    --iters_per_images: extending a finished run (2 -> 4 steps) draws only new grids (no
    samples-2.png again, no early grids of its own start) and changes none of the earlier
    ones; each log window says how many steps it averages (fewer right after a start)."""
    rd = tmp_path / 'x'

    def train(steps):
        p = run(args(fmnist_root, tmp_path, 'x', steps, '--iters_per_images', '2', '--iters_per_print', '4',
                     '--ema_rate', '0.5'))
        return [line.rsplit(' ', 1)[1] for line in p.stdout.splitlines() if 'printing samples to' in line]

    assert train(2) == [str(rd / 'samples-1.png'), str(rd / 'samples-2.png')]
    first = {f: (rd / f).read_bytes() for f in os.listdir(rd) if f.startswith('samples-')}
    assert train(4) == [str(rd / 'samples-4.png')]
    assert all((rd / f).read_bytes() == b for f, b in first.items())
    windows = [(z['step'], z['window_steps']) for z in log_lines(rd, 'train_loss') if 'lr' in z]
    assert windows == [(0, 1), (1, 2), (3, 2)]  # the window after the second start begins at step 2


def test_other_training_data_is_refused(fmnist_root, tmp_path):
    run(args(fmnist_root, tmp_path, 'd', 2))
    other = tmp_path / 'other'
    shutil.copytree(os.path.join(fmnist_root, 'fashion_mnist'), other / 'fashion_mnist')
    import gzip
    path = other / 'fashion_mnist' / 'train-images-idx3-ubyte.gz'
    raw = bytearray(gzip.open(path).read())
    raw[16:] = bytes(255 - b for b in raw[16:])  # same size, other images
    with gzip.open(path, 'wb') as f:
        f.write(bytes(raw))
    p = run(args(str(other), tmp_path, 'd', 4), check=False)
    assert p.returncode == 2 and 'training data' in p.stderr and '--allow_changes' in p.stderr


# ----------------------------------------------------------------------------- signals to the process group

def _wait_for_step(proc, log, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and not (log.exists() and f'"step": {step},' in log.read_text()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)


def _stop_group(cmd, tmp_path, desc, sig=signal.SIGTERM):
    """Start cmd in a session of its own, wait for step 3, signal the whole group."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        _wait_for_step(p, tmp_path / desc / 'log.jsonl', 3)
        os.killpg(p.pid, sig)
        out, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    prefix, st = checkpoints.find_checkpoint(str(tmp_path / desc))
    assert prefix is not None and prefix.endswith('latest') and st['step'] >= 4, out[-3000:]
    assert 'stopped by signal' in out and 'DataLoader worker' not in out, out[-3000:]
    # no traceback but torchrun's own report of the signal it received (it exits 1 by design)
    assert out.count('Traceback') == out.count('SignalException: Process'), out[-3000:]
    return p.returncode, out


def test_sigterm_to_the_process_group_with_workers_stops_cleanly(fmnist_root, tmp_path):
    a = args(fmnist_root, tmp_path, 'g', 100000) + ['--num_workers', '2']
    rc, out = _stop_group([sys.executable, 'train.py', *a], tmp_path, 'g')
    assert rc == 0, out[-3000:]
    assert out.count('received SIGTERM') == 1


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_to_torchrun_group_with_workers_stops_cleanly(fmnist_root, tmp_path, sig):
    """torchrun forwards the signal to its processes as well: every rank finishes the same
    step, latest is written, and only rank 0 reports the signal."""
    from test_train import free_port
    a = args(fmnist_root, tmp_path, 'tr', 100000) + ['--num_workers', '2', '--port', str(free_port())]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py', *a]
    rc, out = _stop_group(cmd, tmp_path, 'tr', sig)
    assert out.count('received SIG') == 1, out[-3000:]
    assert 'ChildFailedError' not in out and out.count('stopped by signal') == 1  # no rank failed


def test_a_repeated_signal_within_the_grace_time_is_the_same_request():
    """Ctrl-C under torchrun reaches each process twice (from the terminal and forwarded):
    that must not abort; a second Ctrl-C after the grace time does."""
    from train_loop import StopSignal
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = StopSignal(is_main=False, grace=0.5)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested is not None
        time.sleep(0.7)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def test_sigterm_to_mpiexec_group_with_workers_stops_cleanly(fmnist_root, tmp_path):
    from test_train import free_port
    mpiexec = shutil.which('mpiexec', path=os.path.dirname(sys.executable)) or shutil.which('mpiexec')
    assert mpiexec, 'mpiexec not found: pip install mpich mpi4py'
    a = args(fmnist_root, tmp_path, 'mpi', 100000) + ['--num_workers', '2', '--port', str(free_port())]
    rc, out = _stop_group([mpiexec, '-n', '2', sys.executable, 'train.py', *a], tmp_path, 'mpi')
    assert rc == 0 and out.count('received SIGTERM') == 1 and out.count('stopped by signal') == 1, out[-3000:]


# ----------------------------------------------------------------------------- data-loading workers

def test_one_loader_with_persistent_workers_keeps_the_data_order_and_ignores_signals(tmp_path):
    """set_epoch(epoch, start_batch) on one DataLoader gives exactly train_batch_indices,
    epoch after epoch, from the same worker processes, which survive SIGTERM and SIGINT;
    spawned workers reopen a memory-mapped source."""
    import data
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / 'x.npy', images)
    for source, ctx in [(data.ArraySource(images, 'mem'), None),
                        (data.open_npy(str(tmp_path / 'x.npy'), 'cifar10').view(np.arange(49, -1, -1)), 'spawn')]:
        order = images if ctx is None else images[::-1]
        loader = data.train_loader(source, 4, seed=3, epoch=0, rank=1, world_size=2, num_workers=2, mp_context=ctx)
        pids = None
        if ctx is None and sys.platform.startswith('linux'):
            iter(loader)  # starts the workers: from their first instant SIGTERM and SIGINT are blocked or ignored
            for w in loader._iterator._workers:
                status = dict(line.split(':\t') for line in open(f'/proc/{w.pid}/status').read().splitlines())
                held = int(status['SigBlk'], 16) | int(status['SigIgn'], 16)
                assert all(held >> (sig - 1) & 1 for sig in (signal.SIGTERM, signal.SIGINT)), status
        for epoch, start in [(0, 0), (1, 2), (2, 0)]:
            loader.sampler.set_epoch(epoch, start)
            want = data.train_batch_indices(50, 4, seed=3, epoch=epoch, rank=1, world_size=2)[start:]
            got = []
            for i, x in enumerate(loader):
                if i == 1:  # both workers have delivered a batch: past their start-up
                    workers = loader._iterator._workers
                    assert pids is None or [w.pid for w in workers] == pids  # the same processes
                    pids = [w.pid for w in workers]
                    for pid in pids:
                        os.kill(pid, signal.SIGTERM)
                        os.kill(pid, signal.SIGINT)
                got.append(x.numpy())
            assert len(got) == len(want)
            for x, rows in zip(got, want):
                np.testing.assert_array_equal(x, order[rows])
        del loader


# ----------------------------------------------------------------------------- logs on clusters

def test_no_progress_bar_updates_in_a_log_file(fmnist_root, tmp_path):
    """A cluster job's stdout and stderr are files: progress bars are off there (without
    --no_progress), so no carriage-return updates pile up; the log lines are all there is.
    With the default flags (workers on) the run also ends: the loader's workers, which
    ignore SIGTERM, are closed by the loop, not left to Python's exit handler."""
    a = args(fmnist_root, tmp_path, 'bar', 3)
    a = [x for x in a if x != '--no_progress']
    del a[a.index('--num_workers'):a.index('--num_workers') + 2]
    with open(tmp_path / 'out.txt', 'w') as out, open(tmp_path / 'err.txt', 'w') as err:
        subprocess.run([sys.executable, 'train.py', *a], cwd=ROOT, stdout=out, stderr=err, timeout=120, check=True)
    # bytes: text mode would read carriage returns as newlines
    raw = (tmp_path / 'out.txt').read_bytes() + (tmp_path / 'err.txt').read_bytes()
    assert b'\r' not in raw and b'it/s' not in raw
    assert b'finished at step 3' in raw and b'\r' not in (tmp_path / 'bar' / 'log.txt').read_bytes()


# ----------------------------------------------------------------------------- the loss plot

def test_loss_curve_points_keep_the_last_record_per_step_and_the_final_save():
    from pictures import LN2, loss_curves
    records = [
        {'type': 'hparam', 'key': 'lr', 'value': 0.1},
        {'type': 'train_loss', 'step': 0, 'lr': 0.1, 'elbo': 5.0},
        {'type': 'train_loss', 'step': 2, 'lr': 0.1, 'elbo': 4.0},
        {'type': 'train_loss', 'step': 4, 'elbo': 3.5},  # written with the step-4 checkpoint
        {'type': 'train_loss', 'step': 4, 'lr': 0.1, 'elbo': 3.0},  # a print at the same step
        {'type': 'eval_loss', 'step': 4, 'elbo': 3.2},
        {'type': 'train_loss', 'step': 6, 'lr': 0.1, 'elbo': 9.0},  # lost: the run resumed at 4
        {'message': 'resuming from latest (step 4, epoch 0)'},
        {'type': 'train_loss', 'step': 4, 'lr': 0.1, 'elbo': 2.5},
        {'type': 'train_loss', 'step': 6, 'lr': 0.1, 'elbo': 2.0},
        {'type': 'train_loss', 'step': 7, 'elbo': 1.5},  # the last save: the run's final point
        {'type': 'eval_loss', 'step': 7, 'elbo': 1.8},
    ]
    tr, va = loss_curves(records)
    assert tr == [(0, 5.0 / LN2), (2, 4.0 / LN2), (4, 2.5 / LN2), (6, 2.0 / LN2), (7, 1.5 / LN2)]
    assert va == [(4, 3.2 / LN2), (7, 1.8 / LN2)]


def test_loss_plot_has_the_rate_distortion_grad_norm_and_skip_panels(tmp_path):
    """write_loss_plot reads the four series of its panels from the log (log_series: the last
    record of a step wins, as for the bits/dim curve) and writes one 2 x 2 figure."""
    from PIL import Image
    from pictures import LN2, log_series, write_loss_plot
    records = [{'type': 'hparam', 'key': 'skip_threshold', 'value': 400.0},
               {'type': 'train_loss', 'step': 0, 'elbo': 5.0, 'distortion': 4.0, 'rate': 1.0, 'grad_norm': 900.0,
                'total_skipped': 1},
               {'type': 'train_loss', 'step': 2, 'elbo': 4.0, 'distortion': 3.5, 'rate': 0.5, 'grad_norm': 50.0,
                'total_skipped': 1},
               {'type': 'train_loss', 'step': 2, 'elbo': 4.0, 'distortion': 3.0, 'rate': 1.0, 'grad_norm': 60.0},
               {'type': 'eval_loss', 'step': 2, 'elbo': 4.2, 'distortion': 3.1, 'rate': 1.1}]
    assert log_series(records, 'train_loss', 'distortion', LN2) == [(0, 4.0 / LN2), (2, 3.0 / LN2)]
    assert log_series(records, 'train_loss', 'rate', LN2) == [(0, 1.0 / LN2), (2, 1.0 / LN2)]
    assert log_series(records, 'train_loss', 'grad_norm') == [(0, 900.0), (2, 60.0)]
    assert log_series(records, 'train_loss', 'total_skipped') == [(0, 1), (2, 1)]
    with open(tmp_path / 'log.jsonl', 'w') as f:
        f.writelines(json.dumps(z) + '\n' for z in records)
    write_loss_plot(str(tmp_path / 'log.jsonl'), str(tmp_path / 'loss.png'))
    assert Image.open(tmp_path / 'loss.png').size == (900, 600)

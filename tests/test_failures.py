"""Every error ends the job, with data-loading workers on (the default --num_workers 2):
an internal error in the loop (python, torchrun), a full disk during a checkpoint save, a
peer killed with SIGKILL; srun launches train as one run.  Each run carries a tag in its
environment, so that every process it started, workers included, can be found afterwards."""
import os
import signal
import subprocess
import sys
import time

import pytest

import checkpoints
from test_reliability import _wait_for_step, args
from test_train import (ROOT, _distributed_matches_single, _worker_pid, event_scalars, fmnist_root, free_port,  # noqa: F401
                        log_lines, run, single_run)

WORKERS = ['--num_workers', '2']
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
FAKE_SRUN = os.path.join(ROOT, 'tests', 'fake_srun.py')

# train.py with two faults a test can switch on, patched in from outside (no hook in train.py):
# VDVAE_TEST_FAIL_RANKS: the ranks whose step 2 raises (an internal error);
# VDVAE_TEST_FULL_DISK: the save of latest-model.th that writes to /dev/full, where every write
# fails with ENOSPC as on a full file system (through torch.save's real zip writer).
WRAPPER = f'''
import builtins, os, sys
sys.path.insert(0, {ROOT!r})
import train, train_loop, utils

real_learning_rate, saves = train_loop.learning_rate, []


def failing_learning_rate(H, it):
    if it == 2 and os.environ.get('RANK', '0') in os.environ.get('VDVAE_TEST_FAIL_RANKS', '').split(','):
        raise RuntimeError('injected failure')
    return real_learning_rate(H, it)


def full_disk_open(path, mode='r', *a, **k):
    name, tmp, _ = os.path.basename(str(path)).partition('.tmp.')
    if tmp and name == 'latest-model.th':  # a save of latest-model.th (utils.atomic_write)
        saves.append(path)
        if str(len(saves)) == os.environ.get('VDVAE_TEST_FULL_DISK'):
            path = '/dev/full'
    return builtins.open(path, mode, *a, **k)


train_loop.learning_rate, utils.open = failing_learning_rate, full_disk_open
if __name__ == '__main__':
    utils.run_main(train.main)
'''


@pytest.fixture
def wrapper(tmp_path):
    path = tmp_path / 'faulty_train.py'
    path.write_text(WRAPPER)
    return str(path)


def tagged_processes(tag):
    """Pids of the live processes (zombies aside) whose environment holds VDVAE_TEST_TAG=tag:
    every process a run started inherits it, data-loading workers and torchrun's ranks (each
    in a session of its own) included."""
    found, want = [], f'VDVAE_TEST_TAG={tag}'.encode()
    for d in os.listdir('/proc'):
        try:
            with open(f'/proc/{d}/stat') as f:
                state = f.read().rsplit(')', 1)[1].split()[0]
            with open(f'/proc/{d}/environ', 'rb') as f:
                env = f.read().split(b'\0')
        except (OSError, IndexError):
            continue
        if state != 'Z' and want in env:
            found.append(int(d))
    return found


def start(cmd, tmp_path, env=None):
    """Popen of ``cmd`` in ROOT, its processes tagged with ``tmp_path`` (see tagged_processes)."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, VDVAE_TEST_TAG=str(tmp_path), **(env or {})))


def finish(p, tmp_path, timeout=60):
    """(returncode, stdout, stderr) of ``p``, which must end within ``timeout`` s and leave
    no process behind (data-loading workers included)."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = '', ''
    deadline = time.time() + 10  # processes already on their way out
    while tagged_processes(tmp_path) and time.time() < deadline:
        time.sleep(0.2)
    left = tagged_processes(tmp_path)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    if p.poll() is None:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f'still running after {timeout} s:\n{out[-2000:]}\n{err[-3000:]}')
    assert not left, f'processes left behind: {left}\n{err[-3000:]}'
    return p.returncode, out, err


def test_internal_error_with_workers_ends_the_process(fmnist_root, tmp_path, wrapper):
    """A bug at step 2 (workers on): the traceback, then the step and the checkpoint that is
    safe, exit status 1, no worker left."""
    a = args(fmnist_root, tmp_path, 'bug', 8) + WORKERS
    rc, _, err = finish(start([sys.executable, wrapper, *a], tmp_path, {'VDVAE_TEST_FAIL_RANKS': '0'}), tmp_path)
    assert rc == 1 and 'RuntimeError: injected failure' in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f'stopped at step 2; {tmp_path / "bug" / "latest"}-* (step 2) is the '
                                            'newest complete checkpoint: the same command continues from it')


def test_internal_error_on_one_torchrun_rank_ends_every_process(fmnist_root, tmp_path, wrapper):
    """Rank 1 fails at step 2: it ends with its traceback, rank 0 (waiting for it in the
    step's all-reduce) with one line saying a peer is gone, torchrun after them."""
    a = args(fmnist_root, tmp_path, 'bug2', 8, '--port', str(free_port())) + WORKERS
    # 25 s: torchrun itself kills a process that outlives a failed peer by 30 s (exit_process)
    rc, out, err = finish(start([*TORCHRUN, wrapper, *a], tmp_path, {'VDVAE_TEST_FAIL_RANKS': '1'}), tmp_path,
                          timeout=25)
    out += err
    assert 'forcefully exiting' not in out, out[-3000:]
    assert rc != 0 and '[rank1]: RuntimeError: injected failure' in out, out[-3000:]
    assert 'error: another process of this run exited or stopped answering' in out, out[-3000:]
    # rank 0 closed its event file before its os._exit: every logged window is there
    logged = {z['step'] + 1 for z in log_lines(tmp_path / 'bug2', 'train_loss') if 'lr' in z}
    assert logged and set(event_scalars(tmp_path / 'bug2', 'train/elbo')) == logged


def test_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_resumes(fmnist_root, tmp_path, wrapper):
    """The save at step 4 meets a full disk inside torch.save: one line naming the file and
    the way out, nothing torn; the same command continues from the step-2 checkpoint."""
    a = args(fmnist_root, tmp_path, 'full', 4) + WORKERS
    rc, _, err = finish(start([sys.executable, wrapper, *a], tmp_path, {'VDVAE_TEST_FULL_DISK': '2'}), tmp_path)
    rd, line = tmp_path / 'full', err.strip()
    assert rc == 2 and len(line.splitlines()) == 1 and 'Traceback' not in line, err[-3000:]
    assert line.startswith(f'error: {rd / "latest-model.th"}: No space left on device; free space on its file '
                           'system, or pass another --save_dir'), line
    assert f'{rd / "latest"}-* (step 2) is the newest complete checkpoint' in line
    assert not [f for f in os.listdir(rd) if '.tmp.' in f]
    p = run(a)
    assert f'resuming from {rd / "latest"} (step 2' in p.stdout
    assert checkpoints.find_checkpoint(str(rd))[1]['step'] == 4


def test_srun_two_tasks_equal_one_process(single_run, fmnist_root, tmp_path):
    """srun's variables (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, rank 0's host
    from the compressed node list) make one run of two processes, not two runs."""
    _distributed_matches_single(single_run, fmnist_root, tmp_path,
                                [sys.executable, FAKE_SRUN, '-n', '2', '--nodelist', 'localhost,node[02-03,7]'],
                                'srun')


def test_peer_killed_under_torchrun_ends_the_run_and_keeps_its_checkpoint(fmnist_root, tmp_path):
    """SIGKILL of rank 1 mid-run (workers on): rank 0 ends at its next collective with one
    line, torchrun after it, nothing left running; the newest set is complete (the sizes and
    CRCs its -state.th recorded: what a resume checks) and rank 0's line names it."""
    a = args(fmnist_root, tmp_path, 'kill', 100000, '--port', str(free_port())) + WORKERS
    p = start([*TORCHRUN, 'train.py', *a], tmp_path)
    rd = tmp_path / 'kill'
    try:
        _wait_for_step(p, rd / 'log.jsonl', 3)
        pid = _worker_pid(p.pid, 1)
        assert pid, 'rank 1 not found'
        os.kill(pid, signal.SIGKILL)
    finally:
        rc, out, err = finish(p, tmp_path, timeout=25)  # as above: within torchrun's 30 s
    out += err
    assert 'forcefully exiting' not in out, out[-3000:]
    assert rc != 0 and 'error: another process of this run exited or stopped answering' in out, out[-3000:]
    prefix, st = checkpoints.find_checkpoint(str(rd))
    assert prefix is not None and st['step'] >= 2 and st['world_size'] == 2
    assert f'{prefix}-* (step {st["step"]}) is the newest complete checkpoint' in out, out[-3000:]


def test_destroying_the_process_group_ends_its_threads(tmp_path):
    """After DDP was built, cleanup_distributed ends gloo's threads.  If they outlive it, one
    of them releasing the last collective's tensor at interpreter exit aborts the process now
    and then, and torchrun reports the finished run as failed.  (Two processes with torchrun's
    variables, without torchrun.)"""
    script = tmp_path / 'threads.py'
    script.write_text(f'''
import os, sys
sys.path.insert(0, {ROOT!r})
import torch
import utils
torch.set_num_threads(1)
threads = lambda: len(os.listdir('/proc/self/task'))
before = threads()
utils.setup_distributed(device='cpu')
torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
utils.cleanup_distributed()
assert threads() == before, f'{{threads() - before}} threads left running'
''')
    env = dict(WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))
    procs = [start([sys.executable, str(script)], tmp_path, dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
    for p in procs:
        rc, _, err = finish(p, tmp_path)
        assert rc == 0, err[-3000:]


# ----------------------------------------------------------------------------- launcher detection

SRUN = dict(SLURM_JOB_ID='5', SLURM_STEP_ID='0', SLURM_PROCID='1', SLURM_LOCALID='1', SLURM_NTASKS='4',
            SLURM_STEP_NUM_TASKS='4', SLURM_NODEID='0', SLURM_STEP_TASKS_PER_NODE='2(x2)')


@pytest.mark.parametrize('env, want', [
    ({}, 'single'),
    (dict(SLURM_JOB_ID='5', SLURM_PROCID='0', SLURM_NTASKS='4', SLURM_LOCALID='0'), 'single'),  # an sbatch script
    (SRUN, 'srun'),
    (dict(SRUN, PMI_RANK='1', PMI_SIZE='4'), 'srun'),  # srun --mpi=pmi2 starting the tasks
    (dict(SRUN, PMIX_RANK='1'), 'srun'),  # srun --mpi=pmix
    (dict(SRUN, SLURM_PROCID='0', SLURM_STEP_NUM_TASKS='1', PMI_RANK='0', PMI_SIZE='4'), 'mpiexec'),  # in a task
    (dict(SRUN, PMI_RANK='1', PMI_SIZE='4', MPI_LOCALNRANKS='2'), 'mpiexec'),  # Hydra's own variable
    (dict(SLURM_JOB_ID='5', SLURM_PROCID='0', SLURM_NTASKS='4', OMPI_COMM_WORLD_RANK='2',
          OMPI_COMM_WORLD_SIZE='4'), 'mpiexec'),  # mpirun in an sbatch script
    (dict(SRUN, RANK='3', WORLD_SIZE='8'), 'torchrun'),  # srun starting torchrun
])
def test_launcher_precedence(env, want):
    from utils import detect_launcher
    assert detect_launcher(env) == want


def test_slurm_host_list_and_tasks_per_node():
    from utils import slurm_hosts, slurm_local_tasks
    assert slurm_hosts('node[01-03,7],gpu5') == ['node01', 'node02', 'node03', 'node7', 'gpu5']
    assert slurm_hosts('rack[1-2]-n[08-09],x') == ['rack1-n08', 'rack1-n09', 'rack2-n08', 'rack2-n09', 'x']
    assert slurm_hosts('localhost') == ['localhost']
    assert slurm_local_tasks(dict(SLURM_STEP_TASKS_PER_NODE='4(x2),3', SLURM_NODEID='2')) == 3
    assert slurm_local_tasks(dict(SLURM_STEP_TASKS_PER_NODE='4(x2),3', SLURM_NODEID='1')) == 4


def test_a_full_disk_inside_torch_save_names_the_file(capsys):
    """torch.save on a full disk raises a RuntimeError ("unexpected pos ...") whose context is
    the OSError: still one line naming the file being written."""
    import torch
    from utils import naming_file, run_main
    files = []

    def save_to_full_disk():
        files.append(open('/dev/full', 'wb'))  # every write fails with ENOSPC
        torch.save({'w': torch.zeros(100000)}, files[-1])  # larger than the file's buffer

    def main():
        with naming_file('/runs/x/latest-opt.th'):
            save_to_full_disk()
    try:
        with pytest.raises(RuntimeError) as raised:
            save_to_full_disk()
        assert isinstance(raised.value.__context__, OSError)  # what run_main used to let through
        with pytest.raises(SystemExit) as e:
            run_main(main)
    finally:
        for f in files:
            try:
                f.close()
            except OSError:  # its buffer cannot be written either
                pass
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith('error: /runs/x/latest-opt.th: No space left on device; '), err

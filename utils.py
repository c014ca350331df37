"""Plumbing shared by the scripts: distributed setup (single process, torchrun, mpiexec or
srun), CPU and device set-up, the IEEE-fp32 context, rank-0 logging (jsonl + txt, the
release's format), all-reduce of statistics, the one atomic file writer, and the entry
points' error handling (one line for a user error, every process ended after any error).
"""
import contextlib
import ctypes
import datetime
import errno
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
# Before any process group exists: imported later (by DDP), its functions' defaults (group=group.WORLD)
# would keep the group past destroy_process_group, and its gloo threads then abort the exiting
# interpreter now and then ("terminate called without an active exception").
import torch.distributed.nn  # noqa: F401
from tqdm import tqdm

from hps import UserError


# ----------------------------------------------------------------------------- distributed

# Whether this process has joined a group of several (setup_distributed); see exit_process.
_JOINED_GROUP = False


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')
    launcher: str = 'single'

    @property
    def is_main(self):
        return self.rank == 0


# Set by mpiexec (MPICH/Hydra, Open MPI) in every rank it starts, and some also by srun's
# MPI plugins (--mpi=pmi2: PMI_RANK/PMI_SIZE; --mpi=pmix: PMIX_RANK) when srun starts the ranks.
MPI_RANK_VARS, MPI_SIZE_VARS = ('PMI_RANK', 'PMIX_RANK', 'OMPI_COMM_WORLD_RANK'), ('PMI_SIZE', 'OMPI_COMM_WORLD_SIZE')
MPIEXEC_ONLY_VARS = ('MPI_LOCALNRANKS', 'OMPI_COMM_WORLD_LOCAL_SIZE')  # never set by srun itself


def srun_tasks(env=os.environ):
    """(task, tasks) of this process in its srun job step, or None when srun did not start it.
    An sbatch script itself also has SLURM_PROCID (0) and SLURM_NTASKS, but only the tasks
    of a step that srun launched have SLURM_STEP_ID."""
    if 'SLURM_PROCID' not in env or 'SLURM_STEP_ID' not in env:
        return None
    return int(env['SLURM_PROCID']), int(env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS', 1)))


def detect_launcher(env=os.environ):
    """Who started this process: 'torchrun' (RANK and WORLD_SIZE), 'mpiexec' (MPI's
    variables), 'srun' (a SLURM job step) or 'single', in that order of precedence.  MPI
    variables that srun's MPI plugin set, the same rank and size as srun's own, count as
    srun: this process is srun's task, and needs no MPI to join the run.  Those an mpiexec
    started inside an srun task or an sbatch script set disagree with the SLURM ones (or
    include variables only mpiexec sets), and mean mpiexec."""
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return 'torchrun'
    task = srun_tasks(env)
    if any(k in env for k in MPI_RANK_VARS + MPI_SIZE_VARS + MPIEXEC_ONLY_VARS):
        srun_set = task is not None and not any(k in env for k in MPIEXEC_ONLY_VARS) and \
            all(int(env[k]) == task[0] for k in MPI_RANK_VARS if k in env) and \
            all(int(env[k]) == task[1] for k in MPI_SIZE_VARS if k in env)
        if not srun_set:
            return 'mpiexec'
    return 'single' if task is None else 'srun'


def slurm_hosts(nodelist):
    """Expand SLURM's compressed host list: 'node[01-03,7],gpu5' -> ['node01', 'node02',
    'node03', 'node7', 'gpu5'] (zero padding kept; several bracket groups in one name, as
    'rack[1-2]-n[1-2]', give every combination, first group slowest)."""
    names, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ','):
        depth += (ch == '[') - (ch == ']')
        if ch == ',' and depth == 0:
            names += _expand_host(nodelist[start:i].strip())
            start = i + 1
    return [n for n in names if n]


def _expand_host(name):
    m = re.match(r'([^\[]*)\[([^\]]*)\](.*)', name)
    if not m:
        return [name]
    head, ranges, rest = m.groups()
    values = []
    for part in ranges.split(','):
        lo, _, hi = part.partition('-')
        values += [str(v).zfill(len(lo)) for v in range(int(lo), int(hi or lo) + 1)]
    return [head + v + tail for v in values for tail in _expand_host(rest)]


def slurm_local_tasks(env=os.environ):
    """Tasks of this srun step on this node, from SLURM_STEP_TASKS_PER_NODE ('2(x3),1':
    2 on each of the first three nodes, 1 on the fourth) and SLURM_NODEID."""
    counts = []
    for part in env.get('SLURM_STEP_TASKS_PER_NODE', env.get('SLURM_TASKS_PER_NODE', '1')).split(','):
        m = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
        counts += [int(m.group(1))] * int(m.group(2) or 1) if m else []
    node = int(env.get('SLURM_NODEID', 0))
    return counts[node] if node < len(counts) else 1


def setup_distributed(port=29500, device=None, timeout=600.0):
    """Detect the launcher (``detect_launcher``) and join the process group.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.  Under mpiexec,
    rank 0's address (``master_address``) and port (MASTER_PORT, else ``port``) are
    broadcast over MPI (mpi4py is imported only then).  Under srun the rank, size and
    node-local rank are SLURM_PROCID, SLURM_STEP_NUM_TASKS (SLURM_NTASKS) and
    SLURM_LOCALID, and rank 0 listens on MASTER_ADDR when set, else on the first host of
    the step's node list (task 0 runs there), at MASTER_PORT, else ``port``.  Otherwise
    one process.  NCCL on GPUs, gloo on CPU.  ``device`` forces 'cpu' or 'cuda'.

    ``timeout`` (seconds) bounds every collective: a process whose peer died or hangs
    raises an error after at most that long (gloo), or is ended by NCCL's watchdog
    (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, PyTorch's default, set here unless given)."""
    use_cuda = torch.cuda.is_available() if device is None else device == 'cuda'
    how = detect_launcher()
    if how == 'torchrun':
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        local_rank, init = int(os.environ.get('LOCAL_RANK', 0)), 'env://'
    elif how == 'mpiexec':
        try:
            from mpi4py import MPI
        except ImportError:
            raise UserError("launched under mpiexec but mpi4py is missing: pip install -r requirements-mpi.txt (pip's "
                            "MPICH), or mpi4py built against your cluster's MPI (see that file)") from None
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, one_node = node.Get_rank(), node.Get_size() == world
        addr, port = comm.bcast((master_address(one_node), int(os.environ.get('MASTER_PORT', port)))
                                if rank == 0 else None, root=0)
        init = f'tcp://{addr}:{port}'
    elif how == 'srun':
        rank, world = srun_tasks()
        local_rank = int(os.environ.get('SLURM_LOCALID', 0))
        nodes = next((os.environ[k] for k in ('SLURM_STEP_NODELIST', 'SLURM_JOB_NODELIST', 'SLURM_NODELIST')
                      if os.environ.get(k)), '')
        addr = os.environ.get('MASTER_ADDR') or (slurm_hosts(nodes) or ['127.0.0.1'])[0]
        init = f'tcp://{addr}:{int(os.environ.get("MASTER_PORT", port))}'
    else:
        rank, world, local_rank, init = 0, 1, 0, None
    dev = cuda_device(local_rank) if use_cuda else torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1:
        global _JOINED_GROUP
        _JOINED_GROUP = True  # this process ends at once after an error (exit_process)
        if use_cuda:
            os.environ.setdefault('TORCH_NCCL_ASYNC_ERROR_HANDLING', '3')  # a timed-out collective ends the process
        dist.init_process_group('nccl' if use_cuda else 'gloo', init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout),
                                **({'device_id': dev} if use_cuda else {}))
    return Dist(rank, world, local_rank, dev, how)


def master_address(one_node):
    """The address rank 0 announces to the others under mpiexec: MASTER_ADDR when set;
    127.0.0.1 when every process runs on this machine; else the address of the interface
    that routes off this machine.  That one comes from a UDP socket "connected" to a
    documentation address (192.0.2.1, RFC 5737): connect() on UDP only picks a route and
    sends nothing.  gethostbyname(gethostname()) is no substitute: on Debian and Ubuntu
    defaults it is 127.0.1.1, which the other machines cannot reach."""
    if os.environ.get('MASTER_ADDR'):
        return os.environ['MASTER_ADDR']
    if one_node:
        return '127.0.0.1'
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(('192.0.2.1', 9))
            addr = s.getsockname()[0]
    except OSError:
        addr = None
    if addr and not addr.startswith('127.') and addr != '0.0.0.0':
        return addr
    addr = socket.gethostbyname(socket.gethostname())
    print(f'warning: no network route off this machine found; announcing {addr} to the other nodes, which they '
          'may not reach: set MASTER_ADDR to an address of this machine that they can reach', file=sys.stderr,
          flush=True)
    return addr


def cuda_device(local_rank):
    """The GPU of the process with this node-local rank, among the visible ones: the only
    one when a launcher gives each process its own (per-rank CUDA_VISIBLE_DEVICES, Slurm's
    --gpus-per-task), else GPU ``local_rank`` of the node."""
    n = torch.cuda.device_count()
    if n == 0:
        raise UserError("no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver); "
                        "run with --device cpu to use the CPU")
    if n == 1:
        return torch.device('cuda', 0)
    if local_rank >= n:
        raise UserError(f"process {local_rank} on this node but only {n} GPUs are visible to it: start at most "
                        f"{n} processes per node (torchrun --nproc_per_node, mpiexec -n / -ppn)")
    return torch.device('cuda', local_rank)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def allreduce(t, op='sum'):
    """In-place all-reduce of a tensor when distributed; identity otherwise."""
    if dist.is_initialized():
        dist.all_reduce(t, op={'sum': dist.ReduceOp.SUM, 'max': dist.ReduceOp.MAX}[op])
    return t


def barrier():
    if dist.is_initialized():
        dist.barrier()


def _collective_device():
    if dist.is_initialized() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


@torch.no_grad()
def param_spread_across_ranks(model):
    """Largest difference between ranks of any parameter tensor's sum (0.0 when the
    replicas are in sync, as DDP promises)."""
    fp = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(_collective_device())
    hi, lo = allreduce(fp.clone(), 'max'), -allreduce(-fp, 'max')
    return (hi - lo).abs().max().item()


def gather_objects(obj):
    """List of ``obj`` from every rank (on every rank)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- CPU runs

def cpu_cores():
    """The cores this process may run on: its affinity mask (what taskset, Slurm's cpusets
    and containers allow), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_cpu(threads=0, keep_heap=True, is_main=True):
    """Settings for a process that computes on the CPU.

    ``threads``: torch's intra-op threads; 0 means this process's share of the cores: the
    cores (cpu_cores) divided by the processes launched on this node (torchrun's
    LOCAL_WORLD_SIZE, MPICH's MPI_LOCALNRANKS, Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE, the
    srun step's tasks on this node).  More than that share is capped to it, with a note
    (printed where ``is_main``): threads beyond the cores never run at once, and
    oversubscribed intra-op threads make each step many times slower.
    ``keep_heap``: see ``keep_freed_heap``.  Returns the thread count."""
    env = os.environ
    local = int(env.get('LOCAL_WORLD_SIZE', env.get('MPI_LOCALNRANKS', env.get('OMPI_COMM_WORLD_LOCAL_SIZE', 0))))
    local = local or (slurm_local_tasks() if srun_tasks() else 1)
    cores = cpu_cores()
    share = max(1, cores // local)
    n = min(threads, share) if threads else share
    if threads > share and is_main:
        print(f'note: --threads {threads} is more than the {cores} cores here'
              + (f' shared by {local} processes' if local > 1 else '') + f' allow; using {n} threads per process',
              flush=True)
    torch.set_num_threads(n)
    if keep_heap:
        keep_freed_heap()
    return n


def configure_device(device, threads=0, keep_heap=True, is_main=True):
    """How train.py sets up its process for training on ``device`` (bench.py times the same
    set-up): on the CPU, configure_cpu; on CUDA, cuDNN's autotuner (fixed shapes: each
    convolution's algorithm is timed once, then reused)."""
    if device.type == 'cpu':
        configure_cpu(threads, keep_heap, is_main)
    else:
        torch.backends.cudnn.benchmark = True


def keep_freed_heap():
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    PyTorch has no caching allocator on the CPU: every step frees and re-allocates the
    same activation and gradient buffers.  By default glibc serves each large buffer with
    a fresh mmap and unmaps it on free, so every step pays the page faults of touching
    that memory anew (3-8% of a training step on the small benchmark models).  Raising the mmap
    and trim thresholds makes such buffers come from the heap, which keeps its pages.
    Values computed are unaffected; the process's resident memory stays at its peak.
    Returns False (and changes nothing) where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(param, value) == 1 for param, value in
               ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)))


@contextlib.contextmanager
def ieee_fp32():
    """fp32 convolutions and matmuls in full IEEE precision inside, previous settings
    restored after.  PyTorch lets cuDNN run fp32 convolutions in TF32 (10-bit mantissa) on
    Ampere and newer GPUs by default, which is fine for training but moves the numbers of
    a 100-layer network; evaluation and sampling run under this so that a released
    checkpoint gets the same figures on any GPU as on the CPU.  No effect on the CPU.

    cuDNN's flags are set so that they agree: PyTorch keeps a legacy ``cudnn.allow_tf32``
    beside the per-operator ``conv`` and ``rnn`` precisions, and refuses to read it (or to
    enter ``cudnn.flags()``) while they disagree.  So the legacy flag goes off first (its
    setter also resets conv and rnn), then conv, rnn and the matmuls are set to IEEE."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = _tf32_flags()
    cudnn.allow_tf32 = False
    cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = matmul.fp32_precision = 'ieee'
    try:
        yield
    finally:
        _set_tf32_flags(saved)


def _tf32_flags():
    """(legacy cudnn.allow_tf32, conv, rnn and matmul fp32_precision) as set now.  Where the
    caller's own mix of the two APIs makes PyTorch refuse to read the legacy flag, it is
    the one value that leaves that mix as it was: the opposite of conv's TF32 setting (when
    conv and rnn agree; when they differ PyTorch refuses to read it whatever its value)."""
    cudnn = torch.backends.cudnn
    ops = cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    try:
        legacy = cudnn.allow_tf32
    except RuntimeError:
        legacy = cudnn_conv_precision() != 'tf32'
    return (legacy,) + ops


def cudnn_conv_precision():
    """The precision of cuDNN's fp32 convolutions, 'tf32' or 'ieee' (or 'none': PyTorch's
    default, IEEE): conv's own setting, where it is 'none' the CUDA backend's, then all
    backends'."""
    p = torch.backends.cudnn.conv.fp32_precision
    for parent in (torch.backends.cudnn, torch.backends):
        p = parent.fp32_precision if p == 'none' else p
    return p


def _set_tf32_flags(flags):
    """Undo ieee_fp32: the legacy flag first (its setter overwrites conv and rnn), then the three precisions."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    cudnn.allow_tf32 = flags[0]
    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision = flags[1:]


# ----------------------------------------------------------------------------- logging

def logger(log_prefix, is_main=True, write=True, hold=False):
    """The release's logger: ``log(*msg, **fields)`` prints a line and appends it to
    ``{log_prefix}.txt`` and, as one JSON object with "time" first, to ``{log_prefix}.jsonl``.
    Only the main rank writes; with ``write=False`` nothing is written, only printed.  With
    ``hold`` the lines are printed at once but reach the files only when ``log.commit()`` is
    called, so a start that fails leaves no trace."""
    jsonl_path, txt_path = f'{log_prefix}.jsonl', f'{log_prefix}.txt'
    held = [] if hold else None

    def append(txt_str, json_str):
        os.makedirs(os.path.dirname(jsonl_path) or '.', exist_ok=True)
        for path, line in ((txt_path, txt_str), (jsonl_path, json_str)):
            with naming_file(path), open(path, 'a+') as f:
                print(line, file=f, flush=True)

    def commit():
        nonlocal held
        lines, held = held or [], None
        for line in lines:
            append(*line)

    def log(*args, pprint=False, **kwargs):
        if not is_main:
            return
        argdict = {'time': time.ctime()}
        if args:
            argdict['message'] = ' '.join(str(x) for x in args)
        argdict.update(kwargs)
        txt = []
        for k in (sorted(argdict) if pprint else list(argdict)):
            val = argdict[k]
            if isinstance(val, np.ndarray):
                val = val.tolist()
            elif isinstance(val, np.integer):
                val = int(val)
            elif isinstance(val, np.floating):
                val = float(val)
            argdict[k] = val
            txt.append(f'{k}: {val:.5f}' if isinstance(val, float) else f'{k}: {val}')
        txt_str = ', '.join(txt)
        json_str = json.dumps(argdict, sort_keys=pprint)
        tqdm.write(txt_str)
        if not write:
            return
        if held is not None:
            held.append((txt_str, json_str))
        else:
            append(txt_str, json_str)

    log.jsonl_path = jsonl_path
    log.commit = commit
    return log


def progress_bar(iterable=None, *, is_main=True, off=False, **kwargs):
    """A tqdm bar on the main process and on a terminal only (not with --no_progress, ``off``).
    On a log file (a cluster job's stdout and stderr) its \\r updates would pile up, and the
    log lines already say how far the run is."""
    return tqdm(iterable, disable=not is_main or off or not sys.stderr.isatty(), **kwargs)


def read_log(path):
    """All JSON objects of a jsonl log (a torn last line from a crash is ignored)."""
    if not os.path.exists(path):
        raise UserError(f"log file {path} does not exist; check --restore_log_path")
    out = []
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file, so not a run log; pass the -log.jsonl file of a checkpoint "
                        "(e.g. latest-log.jsonl) to --restore_log_path") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path} line {i + 1} is not JSON; is this a run log (log.jsonl)?") from None
    return out


# ----------------------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_write(path):
    """Open a temporary file beside ``path`` for binary writing; on success fsync it and
    rename it over ``path``.  A crash leaves the old file or the new one, never a torn one;
    a kill -9 may leave the temporary ``{path}.tmp.{pid}`` (see remove_stale_temporaries).
    A write the file system refuses (disk full) raises an OSError naming ``path``."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with naming_file(path), open(tmp, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """``text`` into ``path`` as UTF-8, atomically (atomic_write): JSON, markdown, stamps."""
    with atomic_write(path) as f:
        f.write(text.encode())


def remove_stale_temporaries(folder):
    """Delete the ``*.tmp.PID`` files atomic_write left in ``folder`` when its process was
    killed (kill -9, power loss): those whose PID is no live process on this machine.
    Returns the names removed.  Call it on the one process that writes the folder."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        m = re.fullmatch(r'.+\.tmp\.(\d+)', name)
        if m and not _pid_alive(int(m.group(1))):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def first_sentence(text):
    """The first sentence of an exception's message (its first line up to '. '), whole: a
    message quoted in one of ours is never cut off mid-word."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ''
    return line.split('. ')[0].rstrip('.')


def is_writable(folder):
    """Whether ``folder`` (or, where it does not exist yet, the nearest folder above it
    that does) lets this process create files."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def check_writable(folder, fix):
    """UserError naming ``folder`` and the way out (``fix``) unless files can be made in it."""
    if not is_writable(folder):
        raise UserError(f"cannot write to {folder}: it is read-only (or not a folder); {fix}")


# ----------------------------------------------------------------------------- errors and exits

def print_once(*args, dist_info=None):
    if dist_info is None or dist_info.is_main:
        print(*args, flush=True)


def say_error(msg):
    """Print a one-line error on stderr."""
    print(f'error: {msg}', file=sys.stderr, flush=True)


def exit_process(code):
    """End the process with ``code``.  A process that has been part of a group of several
    ends at once (os._exit) once its data-loading workers are stopped: after an error a
    peer may be gone, and the process group's destructor, run when Python tears its
    objects down, joins gloo threads still waiting for that peer, for up to --dist_timeout
    (torchrun stops waiting after 30 s and kills the process).  Every file of the run is
    complete by then: checkpoints are written atomically, log lines flushed as they go."""
    if not _JOINED_GROUP:
        sys.exit(code)
    import data  # only on this path: utils does not otherwise depend on the data module
    data.stop_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# A file system that refuses a write: full, over quota, read-only, no permission.
WRITE_REFUSED = {errno.ENOSPC: 'free space on its file system', errno.EDQUOT: 'free space within your quota',
                 errno.EROFS: 'remount its file system writable', errno.EACCES: 'check its permissions',
                 errno.EPERM: 'check its permissions'}
# What gloo's transport says when the process at the other end exited or stopped answering.
PEER_LOST = ('Connection closed by peer', 'Connection reset by peer', 'Timed out waiting')


def os_error_in(e):
    """The OSError behind ``e``: ``e`` itself or the first in its chain of causes and
    contexts (torch.save, for one, turns a failed write into a RuntimeError); else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def naming_file(path):
    """Inside, an OSError that names no file (a write or flush to an open file: disk full,
    quota), also one that torch.save wrapped, is raised again as one naming ``path``."""
    try:
        yield
    except Exception as e:
        err = os_error_in(e)
        if err is None or err.filename or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, path) from e


def lost_peer(e):
    """Whether ``e`` says that another process of the run exited or stopped answering
    (torch.distributed's errors, gloo's transport errors and time-outs)."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in PEER_LOST))


def _notes(e):
    return ''.join(f'; {n}' for n in getattr(e, '__notes__', ()))


def run_main(main):
    """A script's entry point: run ``main()``.  Ends in one line, not a traceback, for a
    UserError (bad flags, missing files: exit status 2), for a write the file system
    refuses (full, read-only: the file and the way out, status 2) and for the loss of
    another process of the run (status 1).  Anything else is a bug: its traceback is
    printed (status 1).  The notes an entry point added to the exception (train.py: the
    step it stopped at and the checkpoint that is safe) end the line or the traceback.
    Data-loading workers end in every case (data.stop_workers)."""
    try:
        main()
    except Exception as e:
        # inside the except clause: leaving it releases the exception, whose frames hold the
        # process group, and its destructor may wait for a peer that is gone (exit_process)
        exit_process(report_error(e))


def report_error(e):
    """Print what ended the process (see run_main); returns the exit status."""
    if isinstance(e, UserError):
        say_error(str(e) + _notes(e))
        return 2
    err = os_error_in(e)
    if err is not None and err.errno in WRITE_REFUSED:
        say_error(f"{err.filename or 'a file'}: {err.strerror}; {WRITE_REFUSED[err.errno]}, or pass another "
                  f"--save_dir, --out_dir or --out{_notes(e)}")
        return 2
    if lost_peer(e):
        # gloo's message without its source position and advice: "Read error [addr]:port: Connection reset by peer"
        detail = re.sub(r'^\[[^\]]*\.cc:\d+\]\s*', '', (str(e).strip().splitlines() or [''])[0]).split('. ')[0]
        slow = '; if it is only slow (a long save), raise --dist_timeout' if 'Timed out' in detail else ''
        say_error(f"another process of this run exited or stopped answering ({detail or type(e).__name__}): "
                  f"its output says why{slow}{_notes(e)}")
        return 1
    # a bug: its traceback and notes (train.py: the step, the safe checkpoint), through the hook that
    # torch.distributed sets to prefix each line with the rank
    sys.excepthook(type(e), e, e.__traceback__)
    return 1

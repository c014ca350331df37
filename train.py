"""Train a VDVAE, or evaluate one on the test split.

    python train.py --hps cifar10                              # one process (CUDA if present)
    torchrun --nproc_per_node 8 train.py --hps imagenet32      # DDP via environment variables
    mpiexec -n 16 python train.py --hps imagenet64             # DDP via MPI, across nodes
    srun -N 2 --ntasks-per-node 8 python train.py --hps imagenet64   # DDP via SLURM's variables
    python train.py --hps cifar10 --test_eval --restore_ema_path cifar10-seed1-iter-1050000-model-ema.th

Everything of a run goes to {save_dir}/{desc}/: log.jsonl/log.txt, hparams.json (the first
configuration) and hparams.jsonl (one line per start: step, changes, configuration),
checkpoints (latest-*, previous-* and iter-N-*: -model.th, -model-ema.th, -opt.th,
-log.jsonl as released, plus -state.th for exact resume), samples-N.png and loss.png.
Re-running the same command continues from the newest complete checkpoint; a folder whose
checkpoints are all damaged is refused (--restart begins afresh, keeping the old files).
SIGTERM or Ctrl-C, to one process or the whole process group, finishes the step, writes
latest and exits 0.  An error ends every process (workers included) with the step it stopped at
and the newest complete checkpoint; a process whose peer died ends at its next collective (at
the latest after --dist_timeout seconds).
"""
import argparse
import collections
import math
import os
import signal
import time

import numpy as np
import torch
from PIL import Image

import data
from checkpoints import (check_restore_paths, data_fingerprint, find_checkpoint, load_for_evaluation,
                         open_run_folder, resolve_weights, restore, save_checkpoint)
from hps import UserError, explicit_flags, get_hparams
from utils import (allreduce, check_writable, cleanup_distributed, configure_device, ieee_fp32,
                   is_writable, logger, naming_file, param_spread_across_ranks, print_once, progress_bar, read_log,
                   run_main, setup_distributed)
from train_step import (COUNTS, STEP_STATS, GraphedStep, build_models, check_cuda_graphs, learning_rate,
                        make_optimizer, make_step, precision_context, wrap_for_training)
from vae import check_hparams
from vae_helpers import KeyedNormal

LN2 = math.log(2)


# ----------------------------------------------------------------------------- set-up

def set_up(argv=None):
    """Resolve H, join the process group, make the run folder and the logger."""
    parser = argparse.ArgumentParser(description='VDVAE')
    H = get_hparams(argv, parser)
    if H.test_eval:
        run_config_for_test_eval(H, parser, argv)
    check_hparams(H)  # the architecture, before any process group, file or data
    d = setup_distributed(H.port, device=None if H.device == 'auto' else H.device, timeout=H.dist_timeout)
    configure_device(d.device, H.threads, is_main=d.is_main)
    H.run_dir = os.path.join(H.save_dir, H.desc)
    check_cuda_graphs(H, d)
    check_restore_paths(H)
    if H.test_eval:  # evaluation only reads the run: a read-only run folder gets no log lines
        write = is_writable(H.run_dir)
        if not write:
            print_once(f'note: {H.run_dir} is read-only: the result is printed, not logged there', dist_info=d)
    else:
        check_writable(H.run_dir, 'pass a --save_dir this process can write to')
        write = True
    # lines reach the run folder only once the start succeeded (log.commit in main)
    log = logger(os.path.join(H.run_dir, 'log'), is_main=d.is_main, write=write, hold=True)
    return H, d, log


def run_config_for_test_eval(H, parser, argv):
    """--test_eval reads a run as sample.py and evaluate.py do: the saved configuration of the
    weights it evaluates (checkpoints.resolve_weights: --restore_ema_path's -state.th, else the run
    folder's newest) is the default of every flag not given, so --save_dir S --desc D is enough for
    any dataset (the run's data_root, its images' shape and normalisation).  Without weights to read,
    nothing changes (load_for_evaluation then says what to pass)."""
    H.explicit = sorted(explicit_flags(parser, argv))
    H.run_dir = os.path.join(H.save_dir, H.desc)
    try:
        resolve_weights(H)
    except UserError:
        pass  # no weights: load_for_evaluation's message says what to pass
    del H['explicit']


# ----------------------------------------------------------------------------- the loop's statistics

def skip_streak(streak, skipped, overflow):
    """Consecutive skipped updates after one more step: one more after a skipped update,
    unchanged after an fp16 overflow step (it says nothing about the gradient's size, and
    the loss scaler deals with it), none after an applied update."""
    return streak + 1 if skipped else streak if overflow else 0


def accumulate_stats(stats, frequency):
    """The release's summary of the last ``frequency`` steps, and ``window_steps``: how many
    steps it averages (fewer than ``frequency`` in the first windows after a start)."""
    window = list(stats)[-frequency:]
    z = {}
    for k in stats[-1]:
        vals = np.array([a[k] for a in window], dtype=float)
        finite = vals[np.isfinite(vals)]
        if k in ('distortion_nans', 'rate_nans', 'skipped_updates', 'overflow_steps'):
            z[k] = int(vals.sum())
        elif k == 'grad_norm':
            z[k] = float(finite.max()) if len(finite) else 0.0
        elif k == 'elbo':
            z['elbo'] = float(vals.mean())
            z['elbo_filtered'] = float(finite.mean()) if len(finite) else float('nan')
        elif k == 'iter_time':
            z[k] = stats[-1][k] if len(stats) < frequency else float(vals.mean())
        else:
            z[k] = float(vals.mean())
    z['elbo_bpd'] = z['elbo'] / LN2
    z['window_steps'] = len(window)
    return z


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(H, d, ema, source, desc='eval'):
    """Exact per-image averages over every image of ``source`` (each visited once across
    ranks), in IEEE fp32 (no TF32, see utils.ieee_fp32).  The posterior noise of image i
    is keyed by (--seed, i, layer, element) (vae_helpers.KeyedNormal), so a checkpoint gets
    the same number for any --n_batch_eval, process count and device, and the training
    RNG stream is not touched."""
    ema.eval()
    # n, elbo, distortion, rate, n_finite, finite elbo, elbo^2 (for the standard error)
    sums = torch.zeros(7, dtype=torch.float64, device=d.device)
    batches = eval_batches(H, d, source)
    with ieee_fp32():
        for positions, x in progress_bar(batches, is_main=d.is_main, off=H.no_progress, desc=desc, leave=False):
            x_in, x_target = data.preprocess(H, x.to(d.device, non_blocking=True))
            with ema.keyed_noise(KeyedNormal(H.seed, positions)):
                out = ema.forward_per_image(x_in, x_target)
            elbo = out['elbo'].double()
            finite = torch.isfinite(elbo)
            sums += torch.stack([torch.full_like(elbo[0], len(elbo)), elbo.sum(), out['distortion'].double().sum(),
                                 out['rate'].double().sum(), finite.double().sum(),
                                 torch.where(finite, elbo, 0.).sum(), elbo.square().sum()])
    n, elbo, distortion, rate, n_finite, finite_elbo, elbo_sq = allreduce(sums).tolist()
    if n == 0:
        raise UserError(f"the evaluation split ({getattr(source, 'path', source)}) is empty")
    se = standard_error(n, elbo, elbo_sq)
    return dict(n_images=int(n), elbo=elbo / n, elbo_se=se, distortion=distortion / n, rate=rate / n,
                elbo_bpd=elbo / n / LN2, elbo_bpd_se=se / LN2, filtered_elbo=finite_elbo / max(n_finite, 1),
                n_nonfinite=int(n - n_finite))


def eval_batches(H, d, source):
    """(positions in the split as an int64 tensor on d.device, uint8 batch) over this rank's
    contiguous shard of ``source``, --n_batch_eval images at a time (default 4 x --n_batch),
    prefetched by one worker (spawned under mpiexec, see worker_start_method)."""
    b = H.n_batch_eval or 4 * H.n_batch
    shard = data.eval_shard(len(source), d.rank, d.world_size)
    loader = data.eval_loader(source, b, rank=d.rank, world_size=d.world_size, num_workers=min(H.num_workers, 1),
                              pin_memory=d.device.type == 'cuda', mp_context=worker_start_method(d))
    for i, x in enumerate(loader):
        yield positions_on(shard[i * b:(i + 1) * b], d.device), x


def positions_on(idx, device):
    """Positions in the split (a contiguous numpy block) as an int64 tensor made on ``device``
    (no copy from the host, which from pageable memory would wait for the device)."""
    first = int(idx[0]) if len(idx) else 0
    return first + torch.arange(len(idx), device=device)


def standard_error(n, total, total_sq):
    """Standard error of the mean of n values from their sum and sum of squares:
    sqrt(sample variance / n), with the unbiased (n - 1) variance; nan for n < 2."""
    if n < 2:
        return float('nan')
    var = max(total_sq - total * total / n, 0.0) / (n - 1)
    return math.sqrt(var / n)


# ----------------------------------------------------------------------------- pictures

def visualization_batch(H, source):
    n = min(H.num_images_visualize, len(source))
    return torch.from_numpy(source[np.arange(n)])


@torch.no_grad()
def sample_grid(H, ema, x_uint8, device):
    """The release's sample grid as a uint8 array (rows*H, cols*W, C): originals;
    reconstructions keeping the first k posterior latents (rest from the prior at t=0.1)
    for num_variables_visualize values of k; unconditional samples at t = 1.0, 0.9, ..."""
    ema.eval()
    x_in, _ = data.preprocess(H, x_uint8.to(device))
    zs = [s['z'] for s in ema.forward_get_latents(x_in)]
    mb = x_uint8.shape[0]
    rows = [x_uint8.numpy()]
    lv_points = np.floor(np.linspace(0, 1, H.num_variables_visualize + 2) * len(zs)).astype(int)[1:-1]
    for i in lv_points:
        rows.append(ema.forward_samples_set_latents(mb, zs[:i], t=0.1))
    for t in [1.0, 0.9, 0.8, 0.7][:H.num_temperatures_visualize]:
        rows.append(ema.forward_uncond_samples(mb, t=t))
    return tile(np.stack(rows))


def tile(batches):
    """(rows, cols, H, W, C) uint8 -> one (rows*H, cols*W, C) image."""
    r, c, h, w, ch = batches.shape
    return batches.transpose(0, 2, 1, 3, 4).reshape(r * h, c * w, ch)


def write_png(im, path):
    """Write a uint8 (H, W, C) array as PNG, atomically."""
    im = im[..., 0] if im.shape[-1] == 1 else im
    tmp = f'{path}.tmp.png'
    with naming_file(path):
        Image.fromarray(im).save(tmp)
    os.replace(tmp, path)


def write_images(H, d, ema, viz_batch, fname, log):
    """Rank 0 only; uses its own RNG stream so training noise is unaffected."""
    devices = [d.device] if d.device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(H.seed)
        write_png(sample_grid(H, ema, viz_batch, d.device), fname)
    log(f'printing samples to {fname}')


def log_series(records, kind, field, unit=1.0):
    """[(step, value / unit)] of ``field`` in the run-log records of type ``kind``, sorted
    by step.  A step logged more than once (a print and a save at the same step, or steps
    trained again after a resume) keeps its last record."""
    points = {}
    for z in records:
        if z.get('type') == kind and 'step' in z and field in z:
            points[z['step']] = z[field] / unit
    return sorted(points.items())


def loss_curves(records):
    """(train, valid) lists of (step, bits/dim) from run-log records, sorted by step.
    train: every train_loss record, the per-print ones and those written with each
    checkpoint (the run's last point); valid: eval_loss records (see log_series)."""
    return [log_series(records, kind, 'elbo', LN2) for kind in ('train_loss', 'eval_loss')]


def write_loss_plot(log_path, png_path):
    """Four panels against step, from the run log: train and valid bits/dim; the train
    distortion and rate (bits/dim); the largest pre-clip gradient norm of each print window,
    with --skip_threshold; the skipped updates since the start."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    records = read_log(log_path)
    tr, va = loss_curves(records)
    grad_norms = log_series(records, 'train_loss', 'grad_norm')
    skipped = log_series(records, 'train_loss', 'total_skipped')
    fig, ((loss, parts), (grad, skips)) = plt.subplots(2, 2, figsize=(9, 6), dpi=100, sharex=True)
    for ax, points, style, label in [
            (loss, tr, '-', 'train (batch average)'), (loss, va, 'o-', 'valid (EMA model)'),
            (parts, log_series(records, 'train_loss', 'distortion', LN2), '-', 'distortion'),
            (parts, log_series(records, 'train_loss', 'rate', LN2), '-', 'rate (KL)'),
            (grad, grad_norms, '-', 'largest of the print window'),
            (skips, skipped, '-', 'since the start')]:
        if points:
            ax.plot(*zip(*points), style, label=label, lw=1)
    threshold = [z['value'] for z in records if z.get('type') == 'hparam' and z.get('key') == 'skip_threshold']
    if threshold and threshold[-1] != -1:
        grad.axhline(threshold[-1], color='gray', ls='--', lw=1, label='--skip_threshold')
    if grad_norms and min(v for _, v in grad_norms) > 0:
        grad.set_yscale('log')  # norms span orders of magnitude early in training
    for ax, ylabel in [(loss, 'negative ELBO (bits/dim)'), (parts, 'bits/dim'), (grad, 'gradient norm (pre-clip)'),
                       (skips, 'skipped updates')]:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    top = max([1] + [1.1 * v for _, v in skipped])
    skips.set_ylim(-0.03 * top, top)  # a count: from 0 (the line at 0 visible), whole numbers
    skips.yaxis.set_major_locator(MaxNLocator(integer=True))
    grad.set_xlabel('step')
    skips.set_xlabel('step')
    fig.tight_layout()
    tmp = png_path + '.tmp.png'
    with naming_file(png_path):
        fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


# ----------------------------------------------------------------------------- loops

def host_copy(t):
    """Start copying a device tensor to the host without waiting; returns a function that
    waits for that copy only (not for work queued after it) and returns the host tensor."""
    if t.device.type != 'cuda':
        return lambda: t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait():
        copied.synchronize()
        return host
    return wait


class StopSignal:
    """SIGTERM/SIGINT: finish the current step, write latest, exit.  A second Ctrl-C, more
    than ``grace`` seconds after the first, aborts; within it, it is the same request
    arriving twice (Ctrl-C reaches torchrun and its processes, and torchrun forwards it).
    The data-loading workers ignore both (data.ignore_stop_signals), so a signal to the
    whole process group (a scheduler, torchrun, Ctrl-C) stops the run the same way.  Only
    the main process says so, once."""

    def __init__(self, is_main=True, grace=3.0):
        self.requested, self.is_main, self.grace = None, is_main, grace  # requested: time of the first signal
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.requested is not None:
            if signum == signal.SIGINT and time.time() - self.requested > self.grace:
                raise KeyboardInterrupt
            return
        self.requested = time.time()
        if self.is_main:
            print(f'\nreceived {signal.Signals(signum).name}: finishing this step, then writing latest', flush=True)


def worker_start_method(d):
    """How data-loading workers start: forking a process that has initialised MPI is
    unsafe, so under mpiexec they are spawned (once per run: the workers persist)."""
    return 'spawn' if d.launcher == 'mpiexec' else None


def train_loop(H, d, splits, model, ema, optimizer, scaler, progress, log, at):
    """Train from ``progress`` (step, epoch, batch) to --max_iters / --num_epochs or a stop
    signal.  ``at['step']``: the step counter, kept up to date for main's report of an error."""
    net = wrap_for_training(H, model, d)
    ctx = precision_context(H, d.device)
    step = make_step(H, net, model, ema, optimizer, scaler, ctx)
    stopper = StopSignal(d.is_main)
    viz_batch = visualization_batch(H, splits.valid)
    valid = splits.valid if not H.valid_images else splits.valid.view(np.arange(min(H.valid_images, len(splits.valid))))
    # the release's early steps: log lines after each start, sample grids at the run's first steps
    early_evals = set([1] + [2 ** exp for exp in range(3, 14)])
    n_batches = data.train_batches_per_epoch(len(splits.train), H.n_batch, d.world_size)
    if n_batches == 0:
        raise UserError(f"the training split has {len(splits.train)} images, fewer than one batch of "
                        f"{H.n_batch} per process x {d.world_size} processes")
    stats = collections.deque(maxlen=max(1, H.iters_per_print))  # the window the log lines summarise
    # Steps queue their statistics on the device (training_step); the host reads them in one
    # go at print, save and checkpoint points (read_stats), not once per step.
    pending = []  # (step, {name: device tensor}, host seconds) of the steps not read yet
    stop_vote = None  # more than one process: the last step's stop vote, on its way to the host
    consecutive_skips, since_start, grid_step = 0, 0, None
    it, epoch, start_batch = progress['step'], progress['epoch'], progress['batch']
    if start_batch >= n_batches:
        epoch, start_batch = epoch + 1, 0
    total = H.max_iters if H.max_iters else H.num_epochs * n_batches
    bar = progress_bar(is_main=d.is_main, off=H.no_progress, total=total, initial=min(it, total), desc='train',
                       unit='it', dynamic_ncols=True)

    def read_stats():
        """Bring the pending steps' statistics to the host (one synchronisation), add them to
        the window, count skipped updates and warn about stalls, in step order."""
        nonlocal consecutive_skips
        if not pending:
            return
        t0 = time.time()
        values = torch.stack([s[k] for _, s, _ in pending for k in STEP_STATS]).view(len(pending), -1).tolist()
        wait = (time.time() - t0) / len(pending)  # the device time the host did not wait for at each step
        for (step_no, _, secs), row in zip(pending, values):
            st = dict(zip(STEP_STATS, row), iter_time=secs + wait)
            st.update({k: int(st[k]) for k in COUNTS})
            stats.append(st)
            progress['skipped'] += st['skipped_updates']
            consecutive_skips = skip_streak(consecutive_skips, st['skipped_updates'], st['overflow_steps'])
            if st['skipped_updates'] and consecutive_skips % H.warn_skipped == 0:
                log(f'WARNING: the last {consecutive_skips} updates were all skipped (grad norm '
                    f'{st["grad_norm"]:.1f} >= skip_threshold {H.skip_threshold}). Training is stalled: '
                    'raise --skip_threshold (or -1 to never skip).', type='warning', step=step_no)
        pending.clear()
        bar.set_postfix(elbo_bpd=f'{stats[-1]["elbo"] / LN2:.3f}', skipped=progress['skipped'])

    def checkpoint(name, ep, batch):
        read_stats()  # progress['skipped'] up to date
        progress.update(step=it, epoch=ep, batch=batch)
        save_checkpoint(H, d, name, model, ema, optimizer, scaler, log, progress)

    done, stop = H.max_iters and it >= H.max_iters, False
    loader = data.train_loader(splits.train, H.n_batch, seed=H.seed, epoch=epoch, rank=d.rank,
                               world_size=d.world_size, start_batch=start_batch, num_workers=H.num_workers,
                               pin_memory=d.device.type == 'cuda', mp_context=worker_start_method(d))
    while not done and epoch < H.num_epochs:
        model.train()
        loader.sampler.set_epoch(epoch, start_batch)  # one loader, persistent workers
        for b, x in enumerate(loader, start=start_batch):
            capturing = getattr(step, 'captures_next', False)
            if capturing:
                bar.set_description('train (capturing the step in a CUDA graph)')
            t0 = time.time()
            st, vote = step(x.to(d.device, non_blocking=True), learning_rate(H, it), stopper.requested is not None)
            if capturing:
                bar.set_description('train')
                log(f'captured the training step in a CUDA graph at step {it}; the steps after it replay the graph',
                    type='cuda_graph', step=it)
            pending.append((it, st, time.time() - t0))
            if d.world_size == 1:
                stop = stopper.requested is not None
            else:  # act on the previous step's vote, which every rank reads alike, without waiting for this step
                stop = stop_vote is not None and stop_vote().item() > 0
                stop_vote = host_copy(vote)
            if it % H.iters_per_print == 0 or since_start in early_evals:
                read_stats()
                log(model=H.desc, type='train_loss', lr=learning_rate(H, it), epoch=epoch, step=it,
                    total_skipped=progress['skipped'], **accumulate_stats(stats, H.iters_per_print),
                    **({'graph_replays': step.replays} if isinstance(step, GraphedStep) else {}))
            it += 1
            at['step'] = it
            since_start += 1
            bar.update(1)
            # samples-N.png: the EMA model after N updates, at the run's early steps (not each start's)
            # and every iters_per_images; so a resumed or extended run never redraws an earlier grid
            if d.is_main and (it % H.iters_per_images == 0 or (it in early_evals and H.dataset != 'ffhq_1024')):
                write_images(H, d, ema, viz_batch, os.path.join(H.run_dir, f'samples-{it}.png'), log)
                grid_step = it
            done = bool(H.max_iters) and it >= H.max_iters
            if it % H.iters_per_save == 0 or stop or done:
                read_stats()
                if np.isfinite(stats[-1]['elbo']) or stop or done:
                    log(model=H.desc, type='train_loss', epoch=epoch, step=it, **accumulate_stats(stats, H.iters_per_print))
                    checkpoint('latest', epoch, b + 1)
            if it % H.iters_per_ckpt == 0:
                checkpoint(f'iter-{it}', epoch, b + 1)
            if stop or done:
                break
        else:
            start_batch = 0
            if epoch % H.epochs_per_eval == 0:
                ev = evaluate(H, d, ema, valid, desc='valid')
                progress['best_eval'] = min(progress['best_eval'], ev['elbo'])
                log(model=H.desc, type='eval_loss', epoch=epoch, step=it, **ev)
                if d.is_main:
                    write_loss_plot(log.jsonl_path, os.path.join(H.run_dir, 'loss.png'))
                if epoch % H.epochs_per_eval_save == 0:
                    checkpoint('latest', epoch + 1, 0)
            epoch += 1
            continue
        break
    bar.close()
    # Close the loader's workers now, not whenever this frame is freed: a reference cycle that
    # holds a frame of this call (matplotlib makes such cycles while plotting) would keep them
    # alive until a garbage collection or the exit (data.stop_workers ends them there).
    del loader
    if stop:  # checkpoint written; the picture of the run so far, for a job that ends here
        if d.is_main:
            write_loss_plot(log.jsonl_path, os.path.join(H.run_dir, 'loss.png'))
        log(f'stopped by signal at step {it}; continue with the same command')
        return
    if d.world_size > 1:
        spread = param_spread_across_ranks(model)
        log(f'parameters differ across ranks by at most {spread}', type='rank_check', step=it, param_spread=spread)
    ev = evaluate(H, d, ema, valid, desc='valid')
    log(model=H.desc, type='eval_loss', epoch=epoch, step=it, **ev)
    if d.is_main:
        if grid_step != it:  # not drawn by the loop after this very update
            write_images(H, d, ema, viz_batch, os.path.join(H.run_dir, f'samples-{it}.png'), log)
        write_loss_plot(log.jsonl_path, os.path.join(H.run_dir, 'loss.png'))
    log(f'finished at step {it}: valid elbo {ev["elbo"]:.4f} ± {ev["elbo_se"]:.4f} nats/dim = '
        f'{ev["elbo_bpd"]:.4f} ± {ev["elbo_bpd_se"]:.4f} bits/dim')


def run_test_eval(H, d, splits, ema, log):
    stats = evaluate(H, d, ema, splits.test, desc='test')
    log(type='test_loss', **stats)
    if d.is_main:
        print(f'test elbo over {stats["n_images"]} images: {stats["elbo"]:.5f} ± {stats["elbo_se"]:.5f} nats/dim = '
              f'{stats["elbo_bpd"]:.5f} ± {stats["elbo_bpd_se"]:.5f} bits/dim (± one standard error of the mean '
              'over images)', flush=True)
    return stats


def main(argv=None):
    H, d, log = set_up(argv)
    try:
        splits = data.load_data(H)
        model, ema = build_models(H, d)
        optimizer = make_optimizer(H, model, d.device)
        scaler = torch.amp.GradScaler(d.device.type) if H.precision == 'fp16' else None
        if H.test_eval:
            load_for_evaluation(H, ema, log)
            log.commit()
            return run_test_eval(H, d, splits, ema, log)
        data_id = data_fingerprint(splits.train)
        found = (None, None) if H.restart else find_checkpoint(H.run_dir)
        progress = restore(H, d, model, ema, optimizer, scaler, log, found=found, data_id=data_id)
        progress['data'] = data_id
        open_run_folder(H, d, progress, found, log)
        for k in sorted(H):
            log(type='hparam', key=k, value=H[k])
        n = model.num_params()
        log(total_params=n, readable=f'{n:,}')
        log(f'{n:,} parameters | {d.world_size} process(es) via {d.launcher} | device {d.device} | '
            f'precision {H.precision} | batch {H.n_batch}/process | logs and checkpoints in {H.run_dir}')
        log('starting at epoch', progress['epoch'], 'iterate', progress['step'], 'eval loss', progress['best_eval'])
        at = dict(step=progress['step'])
        try:
            train_loop(H, d, splits, model, ema, optimizer, scaler, progress, log, at)
        except Exception as e:
            e.add_note(stopped_note(H.run_dir, at['step']))  # utils.run_main prints it after the error
            raise
    finally:
        cleanup_distributed()


def stopped_note(run_dir, step):
    """Where a run that an error stopped stands: the step, and the newest complete
    checkpoint (whose files are safe: the same command continues from it)."""
    try:
        prefix, st = find_checkpoint(run_dir)
    except Exception:  # only a report: the error that stopped the run is what matters
        prefix = None
    if prefix is None:
        return f'stopped at step {step}; {run_dir} holds no complete checkpoint yet'
    return (f'stopped at step {step}; {prefix}-* (step {st["step"]}) is the newest complete checkpoint: '
            'the same command continues from it')


if __name__ == '__main__':
    run_main(main)

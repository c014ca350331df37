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
import os
import signal
import time

import numpy as np
import torch

import data
from checkpoints import (check_restore_paths, data_fingerprint, find_checkpoint, load_for_evaluation,
                         open_run_folder, resolve_weights, restore, save_checkpoint)
from evaluation import LN2, evaluate
from hps import UserError, explicit_flags, get_hparams
from pictures import visualization_batch, write_loss_plot, write_sample_grid
from train_step import (COUNTS, STEP_STATS, GraphedStep, build_models, check_cuda_graphs, learning_rate,
                        make_optimizer, make_step, precision_context, wrap_for_training)
from utils import (check_writable, cleanup_distributed, configure_device, is_writable, logger, param_spread_across_ranks,
                   print_once, progress_bar, run_main, setup_distributed)
from vae import check_hparams


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


# ----------------------------------------------------------------------------- pictures

def write_images(H, d, ema, viz_batch, fname, log):
    """Rank 0 only; uses its own RNG stream so training noise is unaffected."""
    write_sample_grid(H, ema, viz_batch, d.device, fname)
    log(f'printing samples to {fname}')


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
                               pin_memory=d.device.type == 'cuda', mp_context=data.worker_start_method(d.launcher))
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

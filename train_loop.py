"""The training loop of train.py: one loop over the steps of a run, and after each step the
named gates of its periodic work (EDM's "once per tick"): print (a log line of the window's
statistics), images (samples-N.png), save (latest-*), checkpoint (iter-N-*), and at the end
of an epoch evaluate (the EMA model on the validation split).  Where the run stands is one
small record, checkpoints.Progress, that the loop advances and every checkpoint stores.

    progress = checkpoints.restore(...)                      # or Progress() for a new run
    board = tensorboard_log.open_board(H, dist_info, progress.step)
    train_loop(H, dist_info, splits, model, ema, optimizer, scaler, progress, log, board)

A stop signal (SIGTERM, Ctrl-C) finishes the step, saves latest and returns; an error is
raised with progress.step the step it stopped at.
"""
import collections
import os
import signal
import time

import numpy as np
import torch

import data
from checkpoints import save_checkpoint
from evaluation import LN2, evaluate
from hps import UserError
from pictures import visualization_batch, write_loss_plot, write_sample_grid
from train_step import COUNTS, STEP_STATS, GraphedStep, learning_rate, make_step, precision_context, wrap_for_training
from utils import param_spread_across_ranks, progress_bar

# The release's early steps: a log line at these steps after each start, and a sample grid
# after these many updates of the run (not of each start, so a resumed run never redraws one).
EARLY_STEPS = frozenset([1] + [2 ** exp for exp in range(3, 14)])


# ----------------------------------------------------------------------------- the gates

def print_due(H, step, steps_this_start):
    """A log line after step number ``step`` (counted from 0): every --iters_per_print, and at
    the early steps of each start."""
    return step % H.iters_per_print == 0 or steps_this_start in EARLY_STEPS


def images_due(H, updates):
    """samples-N.png after ``updates`` updates: every --iters_per_images, and at the run's
    early steps (not for ffhq_1024, whose grid is slow to draw)."""
    return updates % H.iters_per_images == 0 or (updates in EARLY_STEPS and H.dataset != 'ffhq_1024')


def save_due(H, updates):
    """latest-* every --iters_per_save updates (and when the run stops or ends), unless the
    last step's loss is not finite."""
    return updates % H.iters_per_save == 0


def checkpoint_due(H, updates):
    """iter-N-*, kept for good, every --iters_per_ckpt updates."""
    return updates % H.iters_per_ckpt == 0


def evaluate_due(H, epoch):
    """The validation ELBO (and the loss plot) at the end of every --epochs_per_eval-th epoch;
    latest-* after it when the epoch is also an --epochs_per_eval_save-th."""
    return epoch % H.epochs_per_eval == 0


# ----------------------------------------------------------------------------- the statistics of the steps

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


class StepStats:
    """The steps' statistics.  Each step queues its statistics on the device (``add``); the
    host reads them in one go (``read``: one synchronisation) at print, save and checkpoint
    points, not once per step, and adds them to the window the log lines summarise, counts
    skipped updates (progress.skipped) and warns about stalls, in step order."""

    def __init__(self, H, progress, log, bar):
        self.H, self.progress, self.log, self.bar = H, progress, log, bar
        self.window = collections.deque(maxlen=max(1, H.iters_per_print))
        self.pending = []  # (step, {name: device tensor}, host seconds) of the steps not read yet
        self.consecutive_skips = 0

    def add(self, step, stats, secs):
        self.pending.append((step, stats, secs))

    def read(self):
        if not self.pending:
            return
        H, pending = self.H, self.pending
        t0 = time.time()
        values = torch.stack([s[k] for _, s, _ in pending for k in STEP_STATS]).view(len(pending), -1).tolist()
        wait = (time.time() - t0) / len(pending)  # the device time the host did not wait for at each step
        for (step, _, secs), row in zip(pending, values):
            stats = dict(zip(STEP_STATS, row), iter_time=secs + wait)
            stats.update({k: int(stats[k]) for k in COUNTS})
            self.window.append(stats)
            self.progress.skipped += stats['skipped_updates']
            self.consecutive_skips = skip_streak(self.consecutive_skips, stats['skipped_updates'],
                                                 stats['overflow_steps'])
            if stats['skipped_updates'] and self.consecutive_skips % H.warn_skipped == 0:
                self.log(f'WARNING: the last {self.consecutive_skips} updates were all skipped (grad norm '
                         f'{stats["grad_norm"]:.1f} >= skip_threshold {H.skip_threshold}). Training is stalled: '
                         'raise --skip_threshold (or -1 to never skip).', type='warning', step=step)
        pending.clear()
        self.bar.set_postfix(elbo_bpd=f'{self.window[-1]["elbo"] / LN2:.3f}', skipped=self.progress.skipped)

    def summary(self):
        """accumulate_stats of the window (the pending steps read first)."""
        self.read()
        return accumulate_stats(self.window, self.H.iters_per_print)

    def last_elbo_finite(self):
        """Whether the last step's loss is finite (latest is not overwritten with a NaN model)."""
        self.read()
        return bool(np.isfinite(self.window[-1]['elbo']))


# ----------------------------------------------------------------------------- stopping

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


class StopVote:
    """Whether every process stops after this step.  One process: the signal.  Several: the
    previous step's vote (taken by the step on the device, the same on every rank), read
    without waiting for this step."""

    def __init__(self, world_size, stopper):
        self.world_size, self.stopper, self.previous = world_size, stopper, None

    def after(self, vote):
        if self.world_size == 1:
            return self.stopper.requested is not None
        stop = self.previous is not None and self.previous().item() > 0
        self.previous = host_copy(vote)
        return stop


# ----------------------------------------------------------------------------- the loop

def batches(loader, progress, n_batches, n_epochs):
    """(epoch, batch, last of its epoch, images) from the batch ``progress`` stands at to the
    end of epoch ``n_epochs - 1``, through one loader (its workers persist across epochs)."""
    epoch, start = progress.epoch, progress.batch
    while epoch < n_epochs:
        loader.sampler.set_epoch(epoch, start)
        for b, x in enumerate(loader, start=start):
            yield epoch, b, b + 1 == n_batches, x
        epoch, start = epoch + 1, 0


def write_grid(H, dist_info, ema, images, log, step, board):
    """samples-{step}.png: the grid of the EMA model after ``step`` updates (rank 0), also to
    the run's TensorBoard."""
    path = os.path.join(H.run_dir, f'samples-{step}.png')
    board.image('samples', write_sample_grid(H, ema, images, dist_info.device, path), step)
    log(f'printing samples to {path}')
    return step


def train_loop(H, dist_info, splits, model, ema, optimizer, scaler, progress, log, board):
    """Train from ``progress`` (a checkpoints.Progress, advanced as the run goes) to
    --max_iters / --num_epochs or a stop signal; the print, evaluate, images and save gates
    also write to ``board`` (tensorboard_log.Board)."""
    n_batches = data.train_batches_per_epoch(len(splits.train), H.n_batch, dist_info.world_size)
    if n_batches == 0:
        raise UserError(f"the training split has {len(splits.train)} images, fewer than one batch of "
                        f"{H.n_batch} per process x {dist_info.world_size} processes")
    if progress.batch >= n_batches:  # saved after the last batch of its epoch
        progress.epoch, progress.batch = progress.epoch + 1, 0
    trained = (model, ema, optimizer, scaler)  # what a checkpoint saves
    step = make_step(H, wrap_for_training(H, model, dist_info), *trained, precision_context(H, dist_info.device))
    stopper = StopSignal(dist_info.is_main)
    vote = StopVote(dist_info.world_size, stopper)
    viz_batch = visualization_batch(H, splits.valid)
    valid = splits.valid if not H.valid_images else splits.valid.view(np.arange(min(H.valid_images, len(splits.valid))))
    total = H.max_iters if H.max_iters else H.num_epochs * n_batches
    bar = progress_bar(is_main=dist_info.is_main, off=H.no_progress, total=total, initial=min(progress.step, total),
                       desc='train', unit='it', dynamic_ncols=True)
    stats = StepStats(H, progress, log, bar)
    loader = data.train_loader(splits.train, H.n_batch, seed=H.seed, epoch=progress.epoch, rank=dist_info.rank,
                               world_size=dist_info.world_size, start_batch=progress.batch, num_workers=H.num_workers,
                               pin_memory=dist_info.device.type == 'cuda',
                               mp_context=data.worker_start_method(dist_info.launcher))
    done = bool(H.max_iters) and progress.step >= H.max_iters
    stop, steps_this_start, grid_step = False, 0, None
    model.train()
    for epoch, b, last_of_epoch, x in () if done else batches(loader, progress, n_batches, H.num_epochs):
        it = progress.step  # the number of this step, counted from 0
        capturing = getattr(step, 'captures_next', False)
        if capturing:
            bar.set_description('train (capturing the step in a CUDA graph)')
        t0 = time.time()
        step_stats, stop_vote = step(x.to(dist_info.device, non_blocking=True), learning_rate(H, it),
                                     stopper.requested is not None)
        if capturing:
            bar.set_description('train')
            log(f'captured the training step in a CUDA graph at step {it}; the steps after it replay the graph',
                type='cuda_graph', step=it)
        stats.add(it, step_stats, time.time() - t0)
        stop = vote.after(stop_vote)
        if print_due(H, it, steps_this_start):
            window = stats.summary()  # reads the pending steps: progress.skipped up to date
            record = dict(type='train_loss', lr=learning_rate(H, it), epoch=epoch, step=it,
                          total_skipped=progress.skipped, **window,
                          **({'graph_replays': step.replays} if isinstance(step, GraphedStep) else {}))
            log(model=H.desc, **record)
            board.train(record, H.n_batch * dist_info.world_size)
        progress.step, progress.epoch, progress.batch = it + 1, epoch, b + 1
        steps_this_start += 1
        bar.update(1)
        if dist_info.is_main and images_due(H, progress.step):
            grid_step = write_grid(H, dist_info, ema, viz_batch, log, progress.step, board)
        done = bool(H.max_iters) and progress.step >= H.max_iters
        if (save_due(H, progress.step) or stop or done) and (stats.last_elbo_finite() or stop or done):
            log(model=H.desc, type='train_loss', epoch=epoch, step=progress.step, **stats.summary())
            save_checkpoint(H, dist_info, 'latest', *trained, log, progress)
            board.flush()
        if checkpoint_due(H, progress.step):
            stats.read()  # progress.skipped up to date
            save_checkpoint(H, dist_info, f'iter-{progress.step}', *trained, log, progress)
            board.flush()
        if stop or done:
            break
        if last_of_epoch:
            progress.epoch, progress.batch = epoch + 1, 0
            if evaluate_due(H, epoch):
                ev = evaluate(H, dist_info, ema, valid, desc='valid')
                progress.best_eval = min(progress.best_eval, ev['elbo'])
                log(model=H.desc, type='eval_loss', epoch=epoch, step=progress.step, **ev)
                board.evaluation(progress.step, ev, 'valid')
                if dist_info.is_main:
                    write_loss_plot(log.jsonl_path, os.path.join(H.run_dir, 'loss.png'))
                if epoch % H.epochs_per_eval_save == 0:
                    stats.read()
                    save_checkpoint(H, dist_info, 'latest', *trained, log, progress)
                    board.flush()
    bar.close()
    # Close the loader's workers now, not whenever this frame is freed: a reference cycle that
    # holds a frame of this call (matplotlib makes such cycles while plotting) would keep them
    # alive until a garbage collection or the exit (data.stop_workers ends them there).
    del loader
    if stop:  # checkpoint written; the picture of the run so far, for a job that ends here
        if dist_info.is_main:
            write_loss_plot(log.jsonl_path, os.path.join(H.run_dir, 'loss.png'))
        log(f'stopped by signal at step {progress.step}; continue with the same command')
        return
    if dist_info.world_size > 1:
        spread = param_spread_across_ranks(model)
        log(f'parameters differ across ranks by at most {spread}', type='rank_check', step=progress.step,
            param_spread=spread)
    ev = evaluate(H, dist_info, ema, valid, desc='valid')
    log(model=H.desc, type='eval_loss', epoch=progress.epoch, step=progress.step, **ev)
    board.evaluation(progress.step, ev, 'valid')
    if dist_info.is_main:
        if grid_step != progress.step:  # not drawn by the loop after this very update
            write_grid(H, dist_info, ema, viz_batch, log, progress.step, board)
        write_loss_plot(log.jsonl_path, os.path.join(H.run_dir, 'loss.png'))
    log(f'finished at step {progress.step}: valid elbo {ev["elbo"]:.4f} ± {ev["elbo_se"]:.4f} nats/dim = '
        f'{ev["elbo_bpd"]:.4f} ± {ev["elbo_bpd_se"]:.4f} bits/dim')

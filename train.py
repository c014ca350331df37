"""Train a VDVAE, or evaluate one on the test split.

    python train.py --hps cifar10                              # one process (CUDA if present)
    torchrun --nproc_per_node 8 train.py --hps imagenet32      # DDP via environment variables
    mpiexec -n 16 python train.py --hps imagenet64             # DDP via MPI, across nodes
    srun -N 2 --ntasks-per-node 8 python train.py --hps imagenet64   # DDP via SLURM's variables
    python train.py --hps cifar10 --test_eval --restore_ema_path cifar10-seed1-iter-1050000-model-ema.th

Everything of a run goes to {save_dir}/{desc}/: log.jsonl/log.txt, hparams.json (the first
configuration) and hparams.jsonl (one line per start: step, changes, configuration),
checkpoints (latest-*, previous-* and iter-N-*: -model.th, -model-ema.th, -opt.th,
-log.jsonl as released, plus -state.th for exact resume), samples-N.png, loss.png and
TensorBoard's event files in tensorboard/ (tensorboard_log.py; not with --no_tensorboard).
Re-running the same command continues from the newest complete checkpoint; a folder whose
checkpoints are all damaged is refused (--restart begins afresh, keeping the old files).
SIGTERM or Ctrl-C, to one process or the whole process group, finishes the step, writes
latest and exits 0.  An error ends every process (workers included) with the step it stopped at
and the newest complete checkpoint; a process whose peer died ends at its next collective (at
the latest after --dist_timeout seconds).  The loop itself is train_loop.py; the step, train_step.py.
"""
import argparse
import os

import torch

import data
from checkpoints import (check_restore_paths, data_fingerprint, find_checkpoint, load_for_evaluation, open_run_folder,
                         resolve_weights, restore)
from evaluation import evaluate
from hps import UserError, explicit_flags, get_hparams
from tensorboard_log import Board, check_event_folder, event_folder, open_board
from train_loop import train_loop
from train_step import build_models, check_cuda_graphs, make_optimizer
from utils import (check_writable, cleanup_distributed, configure_device, is_writable, logger, print_once, run_main,
                   setup_distributed)
from vae import check_hparams


# ----------------------------------------------------------------------------- set-up

def set_up(argv=None):
    """Resolve H, join the process group, make the run folder and the logger."""
    parser = argparse.ArgumentParser(description='VDVAE')
    H = get_hparams(argv, parser)
    if H.test_eval:
        run_config_for_test_eval(H, parser, argv)
    check_hparams(H)  # the architecture, before any process group, file or data
    dist_info = setup_distributed(H.port, device=None if H.device == 'auto' else H.device, timeout=H.dist_timeout)
    configure_device(dist_info.device, H.threads, is_main=dist_info.is_main)
    H.run_dir = os.path.join(H.save_dir, H.desc)
    check_cuda_graphs(H, dist_info)
    check_restore_paths(H)
    if H.test_eval:  # evaluation only reads the run: a read-only run folder gets no log lines
        write = is_writable(H.run_dir)
        if not write:
            print_once(f'note: {H.run_dir} is read-only: the result is printed, not logged there', dist_info=dist_info)
    else:
        check_writable(H.run_dir, 'pass a --save_dir this process can write to')
        check_event_folder(H)
        write = True
    # lines reach the run folder only once the start succeeded (log.commit in main)
    log = logger(os.path.join(H.run_dir, 'log'), is_main=dist_info.is_main, write=write, hold=True)
    return H, dist_info, log


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


# ----------------------------------------------------------------------------- the jobs

def run_test_eval(H, dist_info, splits, ema, log, board, step):
    stats = evaluate(H, dist_info, ema, splits.test, desc='test')
    log(type='test_loss', **stats)
    board.evaluation(step, stats, 'test')
    if dist_info.is_main:
        print(f'test elbo over {stats["n_images"]} images: {stats["elbo"]:.5f} ± {stats["elbo_se"]:.5f} nats/dim = '
              f'{stats["elbo_bpd"]:.5f} ± {stats["elbo_bpd_se"]:.5f} bits/dim (± one standard error of the mean '
              'over images)', flush=True)
    return stats


def main(argv=None):
    H, dist_info, log = set_up(argv)
    board = Board()  # writes nothing until the run has started
    try:
        splits = data.load_data(H)
        model, ema = build_models(H, dist_info)
        optimizer = make_optimizer(H, model, dist_info.device)
        scaler = torch.amp.GradScaler(dist_info.device.type) if H.precision == 'fp16' else None
        if H.test_eval:
            step = load_for_evaluation(H, ema, log) or 0  # the checkpoint's step (0: a file of unknown step)
            log.commit()
            if is_writable(event_folder(H)):  # evaluation only adds to the run's events: nothing purged
                board = open_board(H, dist_info, step, training=False)
            return run_test_eval(H, dist_info, splits, ema, log, board, step)
        data_id = data_fingerprint(splits.train)
        found = (None, None) if H.restart else find_checkpoint(H.run_dir)
        progress = restore(H, dist_info, model, ema, optimizer, scaler, log, found=found, data_id=data_id)
        progress.data = data_id
        open_run_folder(H, dist_info, progress, found, log)
        board = open_board(H, dist_info, progress.step)  # hides the curves an earlier start drew past this step
        for k in sorted(H):
            log(type='hparam', key=k, value=H[k])
        n = model.num_params()
        log(total_params=n, readable=f'{n:,}')
        log(f'{n:,} parameters | {dist_info.world_size} process(es) via {dist_info.launcher} | '
            f'device {dist_info.device} | precision {H.precision} | batch {H.n_batch}/process | '
            f'logs and checkpoints in {H.run_dir}')
        log('starting at epoch', progress.epoch, 'iterate', progress.step, 'eval loss', progress.best_eval)
        try:
            train_loop(H, dist_info, splits, model, ema, optimizer, scaler, progress, log, board)
        except Exception as e:
            e.add_note(stopped_note(H.run_dir, progress.step))  # utils.run_main prints it after the error
            raise
    finally:
        cleanup_distributed()
        # here, not at exit: after an error a process of several ends with os._exit (utils.exit_process)
        board.close()


def stopped_note(run_dir, step):
    """Where a run that an error stopped stands: the step, and the newest complete
    checkpoint (whose files are safe: the same command continues from it)."""
    try:
        prefix, state = find_checkpoint(run_dir)
    except Exception:  # only a report: the error that stopped the run is what matters
        prefix = None
    if prefix is None:
        return f'stopped at step {step}; {run_dir} holds no complete checkpoint yet'
    return (f'stopped at step {step}; {prefix}-* (step {state["step"]}) is the newest complete checkpoint: '
            'the same command continues from it')


if __name__ == '__main__':
    run_main(main)

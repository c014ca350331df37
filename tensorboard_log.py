"""TensorBoard event files of a run, in {run_dir}/tensorboard/ (one run per run folder, so
``tensorboard --logdir saved_models`` shows every run side by side).  Written on rank 0 only,
from figures the run already has on the host: the train_loss records of the print windows,
the all-reduced evaluation figures (with the KL per decoder block from the same pass), the
sample grid's uint8 array, the configuration.  Nothing here touches the device except the
peak-memory query (a host-side counter, no synchronisation).  --no_tensorboard turns it off.

    board = open_board(H, dist_info, progress.step)   # hides what an earlier start wrote past that step
    board.train(record, global_batch)                  # at each print window
    board.evaluation(step, ev, 'valid')                # at each evaluation
    board.image('samples', grid, step)                 # whenever samples-N.png is written
    board.flush(); board.close()                       # at save points; at the end or an error

Every event's step is the number of updates done, as in samples-N.png, iter-N-* and the
eval_loss records: a print window's train_loss record of step s (log.jsonl counts the steps
from 0) is at step s + 1, the updates done when the step ended.  So a resume from the
checkpoint at step N re-draws exactly the events past N.

Tags: train/* (elbo, distortion, rate in nats/dim and *_bpd in bits/dim, grad_norm,
skipped_updates, overflow_steps, lr, images_per_s), memory/peak_allocated_gib (CUDA),
valid/* and test/* (elbo, elbo_se, elbo_bpd, elbo_bpd_se, distortion, rate), kl_block/NN
(nats per image, block NN of the decoder, top first), kl_resolution/RxR (its blocks' sum),
kl_by_block (a histogram whose bucket i holds block i's KL: the depth profile over time),
samples (the grid), config (the configuration as JSON) and the hparams plugin's record.
"""
import json
import os

import numpy as np
import torch

from evaluation import LN2, block_resolutions
from utils import check_writable, naming_file

FOLDER = 'tensorboard'  # in the run folder; --restart moves it aside with the run's files

# train_loss record key -> tag (nats/dim figures also in bits/dim, under the tag + '_bpd')
TRAIN_TAGS = {'elbo': 'train/elbo', 'distortion': 'train/distortion', 'rate': 'train/rate',
              'grad_norm': 'train/grad_norm', 'skipped_updates': 'train/skipped_updates',
              'overflow_steps': 'train/overflow_steps', 'total_skipped': 'train/total_skipped', 'lr': 'train/lr'}
PER_DIM = ('elbo', 'distortion', 'rate')
EVAL_KEYS = ('elbo', 'elbo_se', 'elbo_bpd', 'elbo_bpd_se', 'distortion', 'rate')


def event_folder(H):
    return os.path.join(H.run_dir, FOLDER)


def check_event_folder(H):
    """One line (UserError) when the event folder cannot be written, before the run starts."""
    if not H.no_tensorboard:
        check_writable(event_folder(H), 'pass a --save_dir this process can write to, or --no_tensorboard')


def open_board(H, dist_info, step, training=True):
    """The run's Board on rank 0 (a Board that writes nothing elsewhere and with
    --no_tensorboard).  ``training``, a training start at ``step`` (the updates done at the
    checkpoint resumed): hide every event past it that an earlier start wrote (SummaryWriter's
    purge_step hides those at or after step + 1), so a run resumed from an earlier checkpoint
    than it had reached shows each step once (the grid and evaluation of step itself came
    before that checkpoint and stay), and record the configuration.  Not training: a tool
    that only adds its figures (--test_eval, evaluate.py)."""
    if not dist_info.is_main or H.no_tensorboard:
        return Board()
    folder = event_folder(H)
    from torch.utils.tensorboard import SummaryWriter  # ~0.15 s of imports: only where events are written
    with naming_file(folder):
        writer = SummaryWriter(folder, purge_step=step + 1 if training else None)
        board = Board(writer, H, dist_info.device)
        if training:
            writer.add_text('config', '```\n' + json.dumps(dict(H), indent=1, sort_keys=True, default=str) + '\n```',
                            step)
            for s in hparams_summaries(H, ['valid/elbo_bpd', 'train/elbo_bpd']):
                writer.file_writer.add_summary(s)
    return board


def hparams_summaries(H, metrics):
    """The hparams plugin's experiment, session-start and session-end summaries of H, written
    into the run's own event file (SummaryWriter.add_hparams would make a sub-run per call).
    Values that are not numbers, strings or booleans are given as their JSON text."""
    from torch.utils.tensorboard.summary import hparams
    values = {k: v if isinstance(v, (bool, int, float, str)) or v is None else json.dumps(v, default=str)
              for k, v in H.items()}
    return hparams(values, {m: float('nan') for m in metrics})


class Board:
    """A run's TensorBoard writer (``writer`` None: writes nothing).  Every write error names
    the event folder (utils.naming_file), so a full disk is one line like every other output."""

    def __init__(self, writer=None, H=None, device=None):
        self.writer, self.device = writer, device
        self.resolutions = block_resolutions(H) if H is not None else None
        self.folder = writer.get_logdir() if writer is not None else None

    def scalars(self, values, step):
        """{tag: number} at ``step``."""
        if self.writer is None:
            return
        with naming_file(self.folder):
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)

    def train(self, record, global_batch):
        """A print window's train_loss record (the line log.jsonl gets), at the updates done
        after its step (record step + 1).  images/s: the global batch over the window's mean
        host seconds per step."""
        if self.writer is None:
            return
        values = {tag: record[k] for k, tag in TRAIN_TAGS.items() if k in record}
        values.update({f'{TRAIN_TAGS[k]}_bpd': record[k] / LN2 for k in PER_DIM})
        values['train/images_per_s'] = global_batch / record['iter_time']
        if self.device.type == 'cuda':  # the allocator's counter, read on the host: no device sync
            values['memory/peak_allocated_gib'] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.scalars(values, record['step'] + 1)

    def evaluation(self, step, ev, split):
        """evaluation.evaluate's figures (all-reduced) under ``split``/; its KL per decoder
        block as kl_block/NN, kl_resolution/RxR and the kl_by_block histogram."""
        if self.writer is None:
            return
        self.scalars({f'{split}/{k}': ev[k] for k in EVAL_KEYS}, step)
        if split != 'valid':
            return
        kl = np.asarray(ev['kl_per_block'], dtype=np.float64)
        values = {f'kl_block/{i:02d}': v for i, v in enumerate(kl)}
        for r in sorted(set(self.resolutions)):
            values[f'kl_resolution/{r}x{r}'] = sum(v for v, res in zip(kl, self.resolutions) if res == r)
        self.scalars(values, step)
        index = np.arange(len(kl), dtype=np.float64)
        with naming_file(self.folder):  # bucket i = [i - 0.5, i + 0.5): block i, its count the block's KL
            self.writer.add_histogram_raw('kl_by_block', min=0, max=len(kl) - 1, num=float(kl.sum()),
                                          sum=float(index @ kl), sum_squares=float(index ** 2 @ kl),
                                          bucket_limits=(index + 0.5).tolist(), bucket_counts=kl.tolist(),
                                          global_step=step)

    def image(self, tag, im, step):
        """A uint8 (H, W, C) picture (C = 1: grayscale), as written to its PNG."""
        if self.writer is None:
            return
        with naming_file(self.folder):
            self.writer.add_image(tag, im, step, dataformats='HWC')

    def flush(self):
        if self.writer is not None:
            with naming_file(self.folder):
                self.writer.flush()

    def close(self):
        """Write what is queued and close the file (idempotent)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with naming_file(self.folder):
                writer.close()

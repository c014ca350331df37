"""TensorBoard event files of a run, read back with TensorBoard's own reader: the scalars are
log.jsonl's records step for step, the grid is samples-N.png, the KL per block is --kl_stats's,
a crash and a resume from an earlier checkpoint leave each step once, --no_tensorboard writes
nothing and an unwritable event folder is one line.  (Two processes: test_train.py's
_distributed_matches_single checks the one event stream of every launcher.)"""
import collections
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from test_train import ROOT, TINY, fmnist_root, log_lines, run  # noqa: F401

# train.py whose step VDVAE_TEST_FAIL_STEP raises (an injected error, patched in from outside), on a
# slow disk from the step before it on: each event record then takes 0.1 s to write, so the writer's
# thread still holds the last window's events when the error ends the process
FAILING_TRAIN = f'''
import os, sys, time
sys.path.insert(0, {ROOT!r})
import train, train_loop, utils
from tensorboard.summary.writer import record_writer

real_learning_rate, real_write, slow = train_loop.learning_rate, record_writer.RecordWriter.write, []


def failing_learning_rate(H, it):
    fail = int(os.environ['VDVAE_TEST_FAIL_STEP'])
    if it == fail:
        raise RuntimeError('injected failure')
    if it == fail - 1:
        slow.append(it)
    return real_learning_rate(H, it)


def slow_write(writer, data):
    if slow:
        time.sleep(0.1)
    real_write(writer, data)


train_loop.learning_rate, record_writer.RecordWriter.write = failing_learning_rate, slow_write
utils.run_main(train.main)
'''


# the train_loss tags, in the order a print window writes them
TRAIN_TAGS = ['train/elbo', 'train/distortion', 'train/rate', 'train/grad_norm', 'train/skipped_updates',
              'train/overflow_steps', 'train/total_skipped', 'train/lr', 'train/elbo_bpd', 'train/distortion_bpd',
              'train/rate_bpd', 'train/images_per_s']


def events(run_dir):
    """The run's event folder through TensorBoard's loader (every sample kept, purges applied)."""
    acc = EventAccumulator(os.path.join(run_dir, 'tensorboard'), size_guidance={'scalars': 0, 'images': 0,
                                                                                 'histograms': 0, 'tensors': 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    """[(step, value)] of a scalar tag, in the order the reader keeps them."""
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def last_per_step(records, key):
    """{updates done: value} of train_loss records (step + 1), the last record of each step (a
    resumed run re-logs the steps past its checkpoint)."""
    return {z['step'] + 1: z[key] for z in records}


def assert_train_scalars_are_the_log(acc, run_dir):
    """Every print window's train_loss record, once per step, as float32 (TensorBoard's scalar type)."""
    records = [z for z in log_lines(run_dir, 'train_loss') if 'lr' in z]
    for key, tag in [('elbo', 'train/elbo'), ('elbo_bpd', 'train/elbo_bpd'), ('distortion', 'train/distortion'),
                     ('rate', 'train/rate'), ('grad_norm', 'train/grad_norm'), ('lr', 'train/lr'),
                     ('skipped_updates', 'train/skipped_updates'), ('overflow_steps', 'train/overflow_steps')]:
        want = last_per_step(records, key)
        got = scalars(acc, tag)
        assert [s for s, _ in got] == sorted(want), (tag, got)  # each step once
        assert [v for _, v in got] == [np.float32(want[s]) for s in sorted(want)], tag
    want = last_per_step(records, 'iter_time')
    got = dict(scalars(acc, 'train/images_per_s'))
    assert got == pytest.approx({s: 4 / t for s, t in want.items()}, rel=1e-6)  # --n_batch 4, one process
    return records


def test_events_are_the_logs_once_per_step_across_a_crash_and_resume(fmnist_root, tmp_path):
    """An injected error at step 6 (workers on), a resume from the step-4 checkpoint to step 8,
    then --test_eval: the scalars equal log.jsonl's records and each step appears once; the
    failed start's events were written before it exited; the grid is samples-8.png; the
    validation and test figures are the records'; the KL per block is evaluate.py --kl_stats's,
    which adds its own figures to the run's events."""
    wrapper = tmp_path / 'failing_train.py'
    wrapper.write_text(FAILING_TRAIN)
    a = TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 'r', '--max_iters', '8',
                '--iters_per_print', '1', '--iters_per_save', '4', '--iters_per_images', '4', '--n_batch', '4',
                '--num_workers', '2']
    p = subprocess.run([sys.executable, str(wrapper), *a], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, VDVAE_TEST_FAIL_STEP='6'))
    assert p.returncode == 1 and 'RuntimeError: injected failure' in p.stderr, p.stderr[-3000:]
    rd = tmp_path / 'r'
    first, = glob.glob(str(rd / 'tensorboard' / 'events.out.tfevents.*'))
    steps = collections.defaultdict(set)
    for e in EventFileLoader(first).Load():
        for v in e.summary.value:
            steps[v.tag].add(e.step)
    # closed before the process ended: nothing of the failed start lost, its last window's last scalar included
    assert [tag for tag in steps if tag.startswith('train/')] == TRAIN_TAGS
    assert all(steps[tag] == set(range(1, 7)) for tag in TRAIN_TAGS), steps
    run(a)  # the same command: resumes from latest (step 4), re-trains steps 4 and 5
    run(a + ['--test_eval'])
    subprocess.run([sys.executable, 'evaluate.py', '--save_dir', str(tmp_path), '--desc', 'r', '--kl_stats',
                    '--split', 'valid', '--n_images', '300', '--no_progress', '--num_workers', '0', '--threads', '1'],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    acc = events(rd)
    records = assert_train_scalars_are_the_log(acc, rd)
    assert sorted({z['step'] for z in records}) == list(range(8)) and len(records) > 8  # 4 and 5 logged twice

    grids = acc.Images('samples')
    assert [g.step for g in grids] == [1, 4, 8]
    png = np.asarray(Image.open(rd / 'samples-8.png').convert('RGB'))
    assert (grids[-1].height, grids[-1].width) == png.shape[:2]
    np.testing.assert_array_equal(np.asarray(Image.open(__import__('io').BytesIO(grids[-1].encoded_image_string))
                                             .convert('RGB')), png)

    ev, = log_lines(rd, 'eval_loss')  # the run's end (the crashed start never evaluated)
    for k in ('elbo', 'elbo_se', 'elbo_bpd', 'elbo_bpd_se', 'distortion', 'rate'):
        assert scalars(acc, f'valid/{k}') == [(8, np.float32(ev[k]))], k
    test, = log_lines(rd, 'test_loss')
    assert scalars(acc, 'test/elbo') == [(8, np.float32(test['elbo']))]  # at the evaluated checkpoint's step

    kl = json.load(open(rd / 'kl-valid.json'))
    blocks = [b['kl_nats'] for b in kl['blocks']]
    assert len(blocks) == 4 and min(blocks) > 0
    got = [scalars(acc, f'kl_block/{i:02d}') for i in range(4)]
    assert got == [[(8, np.float32(b))] for b in blocks]
    for r in kl['resolutions']:
        assert scalars(acc, f'kl_resolution/{r["resolution"]}x{r["resolution"]}') == \
            [(8, pytest.approx(r['kl_nats'], rel=1e-6))]
    # evaluate.py --kl_stats of the run's checkpoint added its figures to the run's events, at its step
    assert [scalars(acc, f'kl_stats_valid/block_{i:02d}') for i in range(4)] == got
    hist, = acc.Histograms('kl_by_block')
    assert hist.step == 8 and list(hist.histogram_value.bucket) == pytest.approx(blocks, rel=1e-12)

    config = json.loads(acc.Tensors('config/text_summary')[0].tensor_proto.string_val[0].decode().strip('`\n'))
    assert config['n_batch'] == 4 and config['dec_blocks'] == '1x1,7m1,14m7,28m14'
    assert '_hparams_/session_start_info' in acc.PluginTagToContent('hparams')


def test_no_tensorboard_writes_nothing_and_an_unwritable_event_folder_is_one_line(fmnist_root, tmp_path):
    """A file where the event folder goes: the start is refused in one line naming it and the
    flag; with --no_tensorboard the run trains and writes no event file anywhere."""
    rd = tmp_path / 'off'
    os.makedirs(rd)
    (rd / 'tensorboard').write_text('not a folder')
    a = TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 'off', '--max_iters', '2',
                '--n_batch', '4']
    p = run(a, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines() == [
        f'error: cannot write to {rd / "tensorboard"}: it is read-only (or not a folder); pass a --save_dir this '
        'process can write to, or --no_tensorboard']
    assert sorted(os.listdir(rd)) == ['tensorboard']  # nothing else written
    run(a + ['--no_tensorboard'])
    assert (rd / 'latest-state.th').exists()
    assert not glob.glob(str(tmp_path / '**' / '*tfevents*'), recursive=True)

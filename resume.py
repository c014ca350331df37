"""Checkpoints of a run and resuming from them: writing a set, finding the newest complete
set, restoring from it (or from the release's four restore flags), and the run folder's bookkeeping.

A checkpoint set {run_dir}/{name}-* holds the release's four files (-model.th,
-model-ema.th, -opt.th, -log.jsonl) plus -state.th, written last, with the step, epoch,
position in the epoch, every rank's RNG state, the configuration, a fingerprint of the
training data and the size and CRC of the other four.  Before a new `latest` set is
written the complete current one becomes `previous`, so a crash at any point of a save
leaves one complete set behind.  train.py calls these; sample.py and evaluate.py use
find_checkpoint / resolve_weights to read a run.
"""
import json
import os
import shutil
import time
import zlib

import numpy as np
import torch

from hps import UserError, apply_run_config
from utils import (atomic_copy, atomic_save, atomic_write, barrier, file_crc, gather_objects, load_optimizer_file,
                   remove_stale_temporaries, restore_log, restore_params, safe_torch_load, saved_run_config)

CHECKPOINT_FILES = ['-model.th', '-model-ema.th', '-opt.th', '-log.jsonl']


def rng_state(device):
    st = {'cpu': torch.get_rng_state()}
    if device.type == 'cuda':
        st['cuda'] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st, device):
    torch.set_rng_state(st['cpu'])
    if device.type == 'cuda' and 'cuda' in st:
        torch.cuda.set_rng_state(st['cuda'], device)


def save_checkpoint(H, d, name, model, ema, optimizer, scaler, log, progress):
    """Write {run_dir}/{name}-*.  Collective (every rank calls it); rank 0 writes.

    Each file is written atomically; -state.th, written last, records the size and CRC of
    the other four, so a set torn by a crash between renames is recognised and skipped.
    Before a new ``latest`` is written, the complete one becomes ``previous`` (keep_previous),
    so a crash while writing leaves at least one complete set."""
    rngs = gather_objects(rng_state(d.device))
    if d.is_main:
        prefix = os.path.join(H.run_dir, name)
        log(f'Saving model@ {progress["step"]} to {prefix}')
        if name == 'latest':
            keep_previous(H.run_dir)
        atomic_save(model.state_dict(), prefix + '-model.th')
        atomic_save(ema.state_dict(), prefix + '-model-ema.th')
        atomic_save(optimizer.state_dict(), prefix + '-opt.th')
        atomic_copy(log.jsonl_path, prefix + '-log.jsonl')
        files = {suffix: file_crc(prefix + suffix) for suffix in CHECKPOINT_FILES}
        atomic_save(dict(progress, rng=rngs, scaler=scaler.state_dict() if scaler else None, H=dict(H),
                         files=files, world_size=d.world_size), prefix + '-state.th')
    barrier()


def keep_previous(run_dir):
    """Make a complete ``latest`` set the ``previous`` one, as hard links (no copy; a copy
    where the file system has no links).  previous-state.th goes first and comes back
    last, so a crash in between leaves ``previous`` incomplete, never mixed, and ``latest``
    untouched.  A torn ``latest`` never replaces ``previous``."""
    latest, previous = os.path.join(run_dir, 'latest'), os.path.join(run_dir, 'previous')
    if checkpoint_state(latest) is None:
        return
    if os.path.exists(previous + '-state.th'):
        os.remove(previous + '-state.th')
    for suffix in CHECKPOINT_FILES + ['-state.th']:
        src, dst = latest + suffix, previous + suffix
        if os.path.exists(dst) and os.path.samefile(src, dst):
            continue  # linked by an earlier call (renaming a link onto its twin would do nothing)
        tmp = f'{dst}.tmp.{os.getpid()}'
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _state(prefix):
    """The training state recorded in {prefix}-state.th, or None where it is unreadable."""
    try:
        st = safe_torch_load(prefix + '-state.th', 'training state')
        return st if isinstance(st, dict) and 'step' in st and 'files' in st else None
    except UserError:
        return None


def _complete(prefix, st):
    """Whether every file of the set {prefix}-* is present with the size and CRC ``st`` recorded."""
    try:
        return all(os.path.exists(prefix + s) and file_crc(prefix + s) == tuple(st['files'][s])
                   for s in CHECKPOINT_FILES)
    except (KeyError, TypeError, OSError):
        return False


def checkpoint_state(prefix):
    """The training state of the set {prefix}-* if all its files are present and match the
    sizes and CRCs recorded in {prefix}-state.th; None if it is incomplete or torn."""
    st = _state(prefix)
    return st if st is not None and _complete(prefix, st) else None


def find_checkpoint(run_dir):
    """(prefix, state) of the newest complete checkpoint in run_dir, or (None, None).

    Sets are checked newest first (by the step their -state.th records; on a tie, latest),
    and only until one is complete, so the CRCs of older sets' files are not computed."""
    if not os.path.isdir(run_dir):
        return None, None
    readable = []
    for f in sorted(os.listdir(run_dir)):
        if f.endswith('-state.th'):
            prefix = os.path.join(run_dir, f[:-len('-state.th')])
            st = _state(prefix)
            if st is None:
                _warn_incomplete(prefix)
            else:
                readable.append((st, prefix))
    for st, prefix in sorted(readable, key=lambda c: (c[0]['step'], c[1].endswith('latest')), reverse=True):
        if _complete(prefix, st):
            return prefix, st
        _warn_incomplete(prefix)
    return None, None


def _warn_incomplete(prefix):
    print(f'warning: ignoring incomplete checkpoint {prefix}-* (torn or partly written)', flush=True)


def checkpoint_files(run_dir):
    """Names of the checkpoint files in run_dir, complete sets or not."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(f for f in os.listdir(run_dir) if f.endswith(tuple(CHECKPOINT_FILES + ['-state.th'])))


def set_aside(run_dir):
    """--restart: move everything in run_dir (files only) into run_dir/before-restart-TIME/,
    so that a fresh start overwrites nothing.  Returns that folder, or None if run_dir
    held no files."""
    names = [f for f in os.listdir(run_dir) if os.path.isfile(os.path.join(run_dir, f))] \
        if os.path.isdir(run_dir) else []
    if not names:
        return None
    folder = os.path.join(run_dir, 'before-restart-' + time.strftime('%Y%m%d-%H%M%S'))
    os.makedirs(folder)
    for f in names:
        os.replace(os.path.join(run_dir, f), os.path.join(folder, f))
    return folder


# Hyperparameters whose change makes the saved state mean something else: the batch size
# (the position in the epoch), the seed (the data order), the architecture (the weights).
ARCH_KEYS = ['dataset', 'image_size', 'image_channels', 'width', 'zdim', 'enc_blocks', 'dec_blocks',
             'custom_width_str', 'bottleneck_multiple', 'no_bias_above', 'num_mixtures']
EXACT_RESUME_KEYS = ['n_batch', 'seed'] + ARCH_KEYS
# Where the run lives, how it is launched and shown, and what to restore: never a change of the run.
NOT_RUN_KEYS = ['desc', 'save_dir', 'run_dir', 'resume', 'restart', 'allow_changes', 'no_progress', 'port',
                'dist_timeout', 'num_workers', 'threads', 'test_eval', 'restore_path', 'restore_ema_path',
                'restore_log_path', 'restore_optimizer_path']


def changed_hparams(old, new):
    """{key: (old value, new value)} of the run's hyperparameters that differ."""
    return {k: (old[k], new[k]) for k in sorted(set(old) & set(new)) if k not in NOT_RUN_KEYS and old[k] != new[k]}


def data_fingerprint(source):
    """[number of images, CRC32 of 16 evenly spaced images] of a split: recorded in each
    checkpoint, so that resuming on other data (the position in the epoch would point at
    other images) is noticed."""
    n = len(source)
    idx = np.unique(np.linspace(0, n - 1, min(n, 16)).astype(np.int64))
    return [n, zlib.crc32(np.ascontiguousarray(source[idx]).tobytes())]


def check_changes(H, st, prefix, data_id, log):
    """Log the hyperparameters that differ from the checkpoint's (old -> new); refuse those
    that break an exact continuation unless --allow_changes (--test_eval only reads)."""
    if H.test_eval:
        return
    changes = changed_hparams(st['H'], H)
    if changes:
        log('hyperparameters changed since ' + os.path.basename(prefix) + ': '
            + ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changes.items()))
    breaking = [k for k in changes if k in EXACT_RESUME_KEYS]
    if data_id is not None and st.get('data') is not None and list(st['data']) != list(data_id):
        breaking.append(f'training data ({st["data"][0]} -> {data_id[0]} images or their content)')
    if breaking and not H.allow_changes:
        raise UserError(f"resuming {prefix} with changed {', '.join(breaking)} would not continue the same run; "
                        "add --allow_changes to continue anyway, --restart to begin afresh, or use another --desc")


def resolve_weights(H):
    """Weights for the tools that read a run (evaluate.py, sample.py): (path, notes).
    --restore_ema_path / --restore_path win, else the newest complete checkpoint of the run
    folder.  The run's saved config (from its run folder, or from the -state.th beside an
    explicit weights file) becomes the default of every setting not given on the command
    line (``H.explicit``): its architecture, data_root, grid size, ..."""
    if H.restore_ema_path or H.restore_path:
        path = H.restore_ema_path or H.restore_path
        notes = [f'EMA weights {path}' if H.restore_ema_path else
                 f"weights {path} (not an EMA file: pass --restore_ema_path for the paper's numbers)"]
        saved = saved_run_config(path)
    else:
        prefix, st = find_checkpoint(H.run_dir)
        if prefix is None:
            raise UserError(f"no weights to evaluate: pass --restore_ema_path FILE, or the --save_dir/--desc of a "
                            f"run whose folder ({H.run_dir}) holds checkpoints")
        path, saved = prefix + '-model-ema.th', st.get('H')
        notes = [f'EMA weights {path} (step {st.get("step")})']
    changed = apply_run_config(H, saved, set(H.explicit))
    if changed:
        notes.append(f"from the run's saved config: {changed}")
    return path, notes


def check_restore_paths(H):
    for flag in ['restore_path', 'restore_ema_path', 'restore_log_path', 'restore_optimizer_path']:
        if H[flag] and not os.path.isfile(H[flag]):
            raise UserError(f"--{flag} {H[flag]}: no such file")


def restore(H, d, model, ema, optimizer, scaler, log, found=None, data_id=None):
    """Apply --resume / the run folder's newest complete checkpoint, or the release's four
    restore flags (checked to exist by set_up).  ``found``: find_checkpoint's answer when the
    caller already has it; ``data_id``: data_fingerprint of the training split.  Returns
    progress: step, epoch, batch (next batch within the epoch), best_eval, skipped.

    Refuses (UserError) to start from zero in a folder whose checkpoints are all torn, and
    to resume with changed EXACT_RESUME_KEYS or data, unless --restart / --allow_changes."""
    progress = dict(step=0, epoch=0, batch=0, best_eval=float('inf'), skipped=0)
    if H.resume and H.restart:
        raise UserError("--resume continues the run and --restart begins it afresh: pass one of them")
    prefix, st = (None, None) if H.restart else (found or find_checkpoint(H.run_dir))
    if H.resume and prefix is None:
        raise UserError(f"--resume: no complete checkpoint in {H.run_dir}; start without --resume "
                        "(or check --save_dir/--desc)")
    if prefix is None and not H.restart and (old := checkpoint_files(H.run_dir)):
        raise UserError(f"{H.run_dir} holds checkpoint files ({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}) "
                        "but no complete set, so the run cannot continue; to begin afresh add --restart (the old "
                        "files are moved to a before-restart-* folder beside them), or pick another --desc")
    if prefix is not None:
        check_changes(H, st, prefix, data_id, log)
        log(f'resuming from {prefix} (step {st["step"]}, epoch {st["epoch"]})')
        # find_checkpoint has checked every file's size and CRC against the set's record
        restore_params(model, prefix + '-model.th', H, verified=True)
        restore_params(ema, prefix + '-model-ema.th', H, verified=True)
        load_optimizer_file(optimizer, prefix + '-opt.th', verified=True)
        if scaler is not None and st.get('scaler'):
            scaler.load_state_dict(st['scaler'])
        rngs = st['rng']
        if len(rngs) == d.world_size:
            set_rng_state(rngs[d.rank], d.device)
        else:
            log(f'note: checkpoint written by {len(rngs)} processes, now {d.world_size}: '
                'data order is kept, posterior noise is reseeded')
        progress = {k: st.get(k, progress[k]) for k in progress}
        # the position in the epoch counts global batches: convert it if their size changed
        old_global, new_global = st['H']['n_batch'] * st.get('world_size', 1), H.n_batch * d.world_size
        if old_global != new_global and progress['batch']:
            images = progress['batch'] * old_global
            progress['batch'] = images // new_global
            log(f'note: {images} images of epoch {progress["epoch"]} were trained on in batches of {old_global}; '
                f'continuing at batch {progress["batch"]} of {new_global}')
        return progress
    # load everything before logging anything, so a bad file leaves no trace in the run folder
    if H.restore_path:
        restore_params(model, H.restore_path, H)
    if H.restore_ema_path:
        restore_params(ema, H.restore_ema_path, H)
    elif H.restore_path:
        ema.load_state_dict(model.state_dict())
    if H.restore_optimizer_path:
        load_optimizer_file(optimizer, H.restore_optimizer_path)
    if H.restore_log_path:
        best, step, epoch = restore_log(H.restore_log_path)
        # the release restarts at the beginning of the epoch its log reached
        progress.update(step=step, epoch=epoch, batch=0, best_eval=best)
    for flag in ['restore_path', 'restore_ema_path', 'restore_optimizer_path', 'restore_log_path']:
        if H[flag]:
            log(f'restored --{flag} {H[flag]}')
    if H.restore_log_path:
        log(f'starting at epoch {progress["epoch"]}, step {progress["step"]} (from the log); '
            f'best eval elbo so far {progress["best_eval"]}')
    return progress


def load_for_evaluation(H, d, model, ema, optimizer, scaler, log):
    """Weights for --test_eval: an explicit file wins, else the run folder's newest checkpoint."""
    if H.restore_ema_path:
        restore_params(ema, H.restore_ema_path, H)
        log(f'evaluating EMA weights {H.restore_ema_path}')
    elif H.restore_path:
        restore_params(ema, H.restore_path, H)
        log(f'evaluating {H.restore_path} (not an EMA file: pass --restore_ema_path for the paper\'s numbers)')
    elif (found := find_checkpoint(H.run_dir))[0]:
        restore(H, d, model, ema, optimizer, scaler, log, found=found)
    else:
        raise UserError(f"--test_eval needs trained weights: pass --restore_ema_path FILE, or the --desc of a run "
                        f"whose folder ({H.run_dir}) holds checkpoints")


def open_run_folder(H, d, progress, found, log):
    """After a successful start, and only then, write to the run folder (rank 0): move
    old files aside for --restart, remove temporaries of killed processes, write the held
    log lines, hparams.json (the run's first configuration) and one hparams.jsonl line per
    start (step, changes against the checkpoint resumed, full configuration)."""
    if not d.is_main:
        return
    if H.restart and (folder := set_aside(H.run_dir)):
        log(f'--restart: moved the earlier files of {H.run_dir} to {folder}')
    os.makedirs(H.run_dir, exist_ok=True)
    if stale := remove_stale_temporaries(H.run_dir):
        log(f'removed {len(stale)} temporary file(s) of killed processes: {", ".join(stale)}')
    log.commit()
    st = None if H.restart else found[1]
    record = dict(step=progress['step'], time=time.ctime(),
                  changed={k: list(v) for k, v in changed_hparams(st['H'], H).items()} if st else {}, H=dict(H))
    with open(os.path.join(H.run_dir, 'hparams.jsonl'), 'a') as f:
        print(json.dumps(record), file=f, flush=True)
    path = os.path.join(H.run_dir, 'hparams.json')
    if not os.path.exists(path):
        with atomic_write(path) as f:
            f.write(json.dumps(dict(H), indent=1, sort_keys=True).encode())

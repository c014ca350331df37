"""Reproduce the paper's test-set figures from the released checkpoints, one command per preset.

    ./reproduce.sh cifar10                                    # the four released seeds
    ./reproduce.sh imagenet32 --n_importance 100              # + the importance-weighted bound, K = 100
    LAUNCH="torchrun --nproc_per_node 8" ./reproduce.sh imagenet64
    LAUNCH="mpiexec -n 8" ./reproduce.sh ffhq256 --n_batch_eval 8
    ./reproduce.sh ffhq1024 --data_source /path/to/images1024x1024

(reproduce.sh makes the virtualenv as quickstart.sh does, then runs this file.)  Steps:
1. the preset's setup_*.sh puts the data under --data_root (it prints what to do where the
   data must come from you: ImageNet's zips, FFHQ's images);
2. released.py fetches the released EMA weights into --checkpoint_dir and verifies them;
3. train.py --test_eval evaluates each on the full test split (and evaluate.py --n_importance K
   computes the importance-weighted bound), under the launcher in $LAUNCH if set;
4. one line per checkpoint: measured bits/dim +- standard error, the published figure, the
   difference and whether it lies within the noise (|difference| <= 2 standard errors + half a
   unit in the last digit of the published figure); the same in {out}/results.json and
   {out}/results.md.
Flags not listed in --help go to train.py and evaluate.py (e.g. --n_batch_eval, --device).
"""
import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys

import torch

import released
from hps import UserError
from utils import read_log, run_main, write_text

HERE = os.path.dirname(os.path.abspath(__file__))


def setup_command(preset, data_root, source):
    """The preset's setup script as it is meant to be called (see each script's header)."""
    if preset == 'cifar10':
        return ['bash', 'setup_cifar10.sh', data_root]
    if preset in ('imagenet32', 'imagenet64'):
        return ['bash', 'setup_imagenet.sh', preset, data_root] + ([source] if source else [])
    if preset == 'ffhq256':
        return ['bash', 'setup_ffhq256.sh', data_root] + ([source] if source else [])
    if preset == 'ffhq1024':
        if source:
            return ['bash', 'setup_ffhq1024.sh', source, data_root]
        if os.path.isdir(os.path.join(data_root, 'ffhq1024')):
            return None  # set up before; the script needs the images' folder only to set up
        raise UserError("ffhq1024 needs FFHQ's images1024x1024 folder, which you download yourself "
                        "(github.com/NVlabs/ffhq-dataset): pass --data_source PATH/images1024x1024")
    raise UserError(f"no data setup for preset {preset!r}")


def set_up_data(preset, data_root, source):
    cmd = setup_command(preset, data_root, source)
    if cmd is None:
        return
    print(f"[data] {' '.join(cmd)}", flush=True)
    rc = subprocess.run(cmd, cwd=HERE).returncode
    if rc != 0:
        raise UserError(f"{cmd[1]} stopped (exit {rc}); do what its message above says, then run "
                        f"./reproduce.sh {preset} again")


def launch_command(script, args):
    """``python script args`` behind the launcher prefix in $LAUNCH (torchrun takes the script
    itself; mpiexec and others take a command)."""
    prefix = shlex.split(os.environ.get('LAUNCH', ''))
    if prefix and os.path.basename(prefix[0]) == 'torchrun':
        return [*prefix, script, *args]
    return [*prefix, sys.executable, script, *args]


def run(cmd, what):
    print(f"[eval] {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    rc = subprocess.run(cmd, cwd=HERE).returncode
    if rc != 0:
        raise UserError(f"{what} failed (exit {rc}); see its message above")


def evaluate_elbo(preset, path, run_dir, common):
    """train.py --test_eval on one checkpoint; returns the test_loss record it logs."""
    log_path = os.path.join(run_dir, 'log.jsonl')
    before = len(read_log(log_path)) if os.path.exists(log_path) else 0
    save_dir, desc = os.path.split(run_dir)
    run(launch_command('train.py', ['--hps', preset, '--test_eval', '--restore_ema_path', path, '--save_dir',
                                    save_dir, '--desc', desc, *common]), f'train.py --test_eval on {path}')
    found = [z for z in read_log(log_path)[before:] if z.get('type') == 'test_loss']
    if not found:
        raise UserError(f"train.py --test_eval wrote no test_loss record to {log_path}")
    return found[-1]


def evaluate_iw(preset, path, run_dir, K, common):
    """evaluate.py --n_importance K on the test split; returns its summary."""
    run(launch_command('evaluate.py', ['--hps', preset, '--restore_ema_path', path, '--n_importance', str(K),
                                       '--split', 'test', '--out_dir', run_dir, *common]),
        f'evaluate.py --n_importance {K} on {path}')
    with open(os.path.join(run_dir, f'iwae-test-k{K}.json')) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- comparison

def last_digit(published):
    """Half a unit in the last printed digit of a published figure: '3.80' -> 0.005."""
    decimals = len(published.split('.')[1]) if '.' in published else 0
    return 0.5 * 10 ** -decimals


def compare(measured, se, published):
    """The measured bits/dim against a published one: the difference, the noise allowance
    (2 standard errors of the measured mean + the published figure's rounding) and whether
    the difference lies within it."""
    diff = measured - float(published)
    tolerance = 2 * se + last_digit(published)
    return dict(published_bpd=published, diff_bpd=diff, tolerance_bpd=tolerance,
                within_noise=bool(abs(diff) <= tolerance))


def result_row(rel, path, stamp, test, iw=None):
    row = dict(checkpoint=rel.name, file=path, sha256=stamp['sha256'], overrides=stamp['overrides'],
               n_images=test['n_images'], elbo_nats=test['elbo'], elbo_nats_se=test['elbo_se'],
               measured_bpd=test['elbo_bpd'], measured_bpd_se=test['elbo_bpd_se'],
               **compare(test['elbo_bpd'], test['elbo_bpd_se'], rel.published_bpd))
    if iw is not None:
        row.update(n_importance=iw['n_importance'], iw_bpd=iw['iw_nll_bits_per_dim'],
                   iw_bpd_se=iw['iw_nll_bits_per_dim_stderr'], iw_gain_nats=iw['iw_gain_nats_per_dim'])
    return row


def mean_row(preset, rows):
    """The mean over a preset's checkpoints against the paper's mean.  The checkpoints share
    the test images, so their errors are correlated; the mean of their standard errors bounds
    the standard error of the mean from above."""
    n = len(rows)
    measured = sum(r['measured_bpd'] for r in rows) / n
    se = sum(r['measured_bpd_se'] for r in rows) / n
    row = dict(checkpoint=f'mean of {n}', n_images=rows[0]['n_images'], measured_bpd=measured,
               measured_bpd_se=se, se_is_upper_bound=True,
               **compare(measured, se, released.PUBLISHED_MEAN_BPD[preset]))
    if all('iw_bpd' in r for r in rows):
        row.update(n_importance=rows[0]['n_importance'], iw_bpd=sum(r['iw_bpd'] for r in rows) / n,
                   iw_bpd_se=sum(r['iw_bpd_se'] for r in rows) / n)
    return row


def describe(row):
    """One printed line per checkpoint."""
    le = '<=' if row.get('se_is_upper_bound') else ''
    verdict = 'within the noise' if row['within_noise'] else 'NOT within the noise'
    iw = (f"; IW bound K={row['n_importance']}: {row['iw_bpd']:.4f} ± {le}{row['iw_bpd_se']:.4f}"
          if 'iw_bpd' in row else '')
    return (f"{row['checkpoint']:28s} {row['measured_bpd']:.4f} ± {le}{row['measured_bpd_se']:.4f} bits/dim "
            f"({row['n_images']} images) | published {row['published_bpd']} | difference {row['diff_bpd']:+.4f} | "
            f"{verdict} (|difference| <= {row['tolerance_bpd']:.4f} = 2 SE + rounding){iw}")


def markdown(report):
    iw = any('iw_bpd' in r for r in report['rows'])
    head = ['checkpoint', 'test images', 'measured bits/dim (± SE)', 'published', 'difference', 'within noise']
    lines = [f"Test-set negative ELBO of the released {report['preset']} checkpoint(s), measured "
             f"{report['date']} on {report['device']} (torch {report['torch']}, vdvae {report['commit']}).",
             '', '| ' + ' | '.join(head + ([f"IW bound K={report['n_importance']} (± SE)"] if iw else [])) + ' |',
             '|' + '---|' * (len(head) + iw)]
    for r in report['rows']:
        le = '≤' if r.get('se_is_upper_bound') else ''
        cells = [r['checkpoint'], str(r['n_images']), f"{r['measured_bpd']:.4f} ± {le}{r['measured_bpd_se']:.4f}",
                 r['published_bpd'], f"{r['diff_bpd']:+.4f}", 'yes' if r['within_noise'] else 'no']
        if iw:
            cells.append(f"{r['iw_bpd']:.4f} ± {le}{r['iw_bpd_se']:.4f}" if 'iw_bpd' in r else '')
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', 'SE: standard error of the mean over test images. "Within noise": |difference| ≤ 2 SE + half a '
              'unit in the published figure\'s last digit.'
              + (' The mean row\'s SE is the mean of the seeds\' SEs, an upper bound (the seeds share the test '
                 'images).' if any(r.get('se_is_upper_bound') for r in report['rows']) else '')]
    return '\n'.join(lines) + '\n'


def device_name(common):
    """The machine the evaluations ran on, for the results table."""
    flags = ' '.join(common).replace('--device=', '--device ').split()
    wanted = flags[flags.index('--device') + 1] if '--device' in flags[:-1] else 'auto'
    if torch.cuda.is_available() and wanted != 'cpu':
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}" if n > 1 else torch.cuda.get_device_name(0)
    try:
        with open('/proc/cpuinfo') as f:
            model = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), None)
    except OSError:
        model = None
    return f"CPU ({model or platform.machine()}, {os.cpu_count()} cores)"


def git_commit():
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=HERE, capture_output=True, text=True)
        return out.stdout.strip() or 'unknown'
    except OSError:
        return 'unknown'


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Reproduce the paper\'s test-set bits/dim from the released checkpoints.',
                                epilog='Other flags go to train.py and evaluate.py. $LAUNCH puts a launcher in front '
                                       'of them, e.g. LAUNCH="torchrun --nproc_per_node 8".')
    p.add_argument('preset', choices=list(dict.fromkeys(r.preset for r in released.RELEASES)))
    p.add_argument('--n_importance', type=int, default=None, metavar='K',
                   help='also the importance-weighted bound with K samples per image (evaluate.py)')
    p.add_argument('--iw_batch', type=int, default=0, help='evaluate.py --iw_batch: samples per decoder pass')
    p.add_argument('--data_root', default='./data', help='where the data goes (default ./data)')
    p.add_argument('--data_source', default=None,
                   help='passed to the setup script: imagenet: the folder holding the downloaded zips or tars; '
                        'ffhq256: a copy of ffhq-256.npy or a folder of PNGs; ffhq1024: FFHQ\'s images1024x1024')
    p.add_argument('--checkpoint_dir', default=released.DEFAULT_DIR, help='where the checkpoints go')
    p.add_argument('--base_url', default=None, help=f'checkpoint mirror (default ${released.URL_ENV} or the '
                                                    'release\'s)')
    p.add_argument('--out', default=None, help='results folder (default ./saved_models/reproduce-PRESET)')
    args, common = p.parse_known_args(argv)
    if args.n_importance is not None and args.n_importance < 1:
        raise UserError(f"--n_importance must be at least 1 (got {args.n_importance})")
    for flag in ('--restore_ema_path', '--restore_path', '--test_eval', '--hps', '--save_dir', '--desc'):
        if any(c == flag or c.startswith(flag + '=') for c in common):
            raise UserError(f"{flag} is set by reproduce.py itself; leave it out")
    args.out = args.out or os.path.join('saved_models', f'reproduce-{args.preset}')
    # the scripts run from the repository's folder: paths given relative to here must not move
    for name in ('data_root', 'checkpoint_dir', 'out', 'data_source'):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    return args, common


def main(argv=None):
    args, common = parse_args(argv)
    released.hparams_for(args.preset, common)  # bad hps.py flags fail here, before any download
    set_up_data(args.preset, args.data_root, args.data_source)
    fetched = released.fetch(args.preset, args.checkpoint_dir, base_url=args.base_url, argv=common)
    common = ['--data_root', args.data_root, *common]
    rows = []
    for rel, path, stamp in fetched:
        # the layer string that fits the file (ffhq1024) was found for the flags given: it comes last
        extra = common + [a for k, v in stamp['overrides'].items() for a in (f'--{k}', v)]
        run_dir = os.path.join(args.out, rel.name)
        test = evaluate_elbo(args.preset, path, run_dir, extra)
        iw = None
        if args.n_importance:
            iw_extra = extra + (['--iw_batch', str(args.iw_batch)] if args.iw_batch else [])
            iw = evaluate_iw(args.preset, path, run_dir, args.n_importance, iw_extra)
        rows.append(result_row(rel, path, stamp, test, iw))
    if args.preset in released.PUBLISHED_MEAN_BPD:
        rows.append(mean_row(args.preset, rows))
    report = dict(preset=args.preset, date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                  device=device_name(common), launcher=os.environ.get('LAUNCH', ''), torch=torch.__version__,
                  commit=git_commit(), n_importance=args.n_importance, rule='|diff| <= 2 SE + half a unit in the '
                  'published figure\'s last digit', rows=rows)
    os.makedirs(args.out, exist_ok=True)
    write_text(os.path.join(args.out, 'results.json'), json.dumps(report, indent=1) + '\n')
    write_text(os.path.join(args.out, 'results.md'), markdown(report))
    print(f"\n{args.preset}: test-set negative ELBO against the published figures")
    for row in rows:
        print(describe(row))
    print(f"written: {os.path.join(args.out, 'results.json')} and results.md")
    bad = [r['checkpoint'] for r in rows if not math.isfinite(r['measured_bpd'])]
    if bad:
        raise UserError(f"non-finite test ELBO for {', '.join(bad)}")
    return report


if __name__ == '__main__':
    run_main(main)

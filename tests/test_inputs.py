"""Bad input gets one line and exit status 2 before anything is written; a run's saved
configuration is the default of the tools that read it; sample.py and evaluate.py speak
one vocabulary; damaged checkpoint files are recognised; --grad_clip -1 means no clipping.

Most cases run the entry points in this process through utils.run_main (the same code the
scripts run), so an error that is not a one-line UserError surfaces as an exception here."""
import argparse
import builtins
import errno
import os
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from PIL import Image

import bench
import evaluate
import hps
import checkpoints
import sample
import train
import train_step
from conftest import ref
from hps import UserError, get_hparams
from test_train import TINY, fmnist_root, run as run_train  # noqa: F401 (fixture)
from checkpoints import describe_mismatch
from utils import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tiny run's picture settings differ from every preset's, so a grid shows whose settings it used
VIZ = ['--num_images_visualize', '3', '--num_variables_visualize', '2', '--num_temperatures_visualize', '1']


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope='module')
def tiny_run(fmnist_root, tmp_path_factory):
    """(data root, save_dir): a 2-step run 'r' of the tiny model, trained with a --data_root
    and grid settings that no tool's default knows."""
    save = tmp_path_factory.mktemp('runs')
    run_train(TINY + VIZ + ['--data_root', fmnist_root, '--save_dir', str(save), '--desc', 'r', '--max_iters', '2',
                            '--n_batch', '4'])
    return fmnist_root, str(save)


def exits_2(capsys, main, argv):
    """Run an entry point as its script does; assert exit status 2 with one line on stderr
    (no traceback: any other exception fails the test) and return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith('error: ') and 'Traceback' not in err, err
    return err


def snapshot(folder):
    """Every path under folder with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def make_read_only(monkeypatch, folder):
    """Make ``folder`` behave as on a read-only file system for this process: os.access
    denies writing, and opening a file for writing, making a folder, renaming or removing
    inside it raise EROFS.  (The tests run as root, which chmod does not stop.)"""
    folder = os.path.realpath(folder)

    def inside(p):
        if isinstance(p, int):
            return False
        p = os.path.realpath(os.fsdecode(os.fspath(p)))
        return p == folder or p.startswith(folder + os.sep)

    def refuse(p):
        raise PermissionError(errno.EROFS, 'Read-only file system', os.fsdecode(os.fspath(p)))

    real_access, real_open, real_mkdir = os.access, builtins.open, os.mkdir
    real_replace, real_remove = os.replace, os.remove
    monkeypatch.setattr(os, 'access', lambda p, mode, *a, **k: (not (inside(p) and mode & os.W_OK))
                        and real_access(p, mode, *a, **k))

    def open_(f, mode='r', *a, **k):
        if any(c in mode for c in 'wax+') and inside(f):
            refuse(f)
        return real_open(f, mode, *a, **k)

    monkeypatch.setattr(builtins, 'open', open_)
    monkeypatch.setattr(os, 'mkdir', lambda p, *a, **k: refuse(p) if inside(p) else real_mkdir(p, *a, **k))
    monkeypatch.setattr(os, 'replace', lambda s, d, *a, **k: refuse(d) if inside(d) or inside(s)
                        else real_replace(s, d, *a, **k))
    monkeypatch.setattr(os, 'remove', lambda p, *a, **k: refuse(p) if inside(p) else real_remove(p, *a, **k))


# ----------------------------------------------------------------------------- --grad_clip -1

def test_grad_clip_minus_one_means_no_clipping():
    """-1 takes the same step as an unreachable clip and still reports the gradient norm;
    a clip below the norm takes a different (shorter) step."""
    d = train.setup_distributed(device='cpu')
    x = torch.randn(4, 28, 28, 1, generator=torch.Generator().manual_seed(0))
    xt = torch.rand(4, 28, 28, 1, generator=torch.Generator().manual_seed(1)) * 2 - 1
    after = {}
    for clip in ['-1', '1e30', '1e-3']:
        H = get_hparams(TINY + ['--grad_clip', clip, '--skip_threshold', '-1'])
        model, ema = train_step.build_models(H, d)
        opt = train_step.make_optimizer(H, model, d.device)
        st, _ = train_step.training_step(H, x, xt, model, model, ema, opt, None, train_step.precision_context(H, d.device),
                                    1e-2, False)
        after[clip] = (st['grad_norm'], [p.detach().clone() for p in model.parameters()])
    assert after['-1'][0] == after['1e30'][0] > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(after['-1'][1], after['1e30'][1]))
    assert not all(torch.equal(a, b) for a, b in zip(after['-1'][1], after['1e-3'][1]))


# ----------------------------------------------------------------------------- numbers at parse time

# a value outside the allowed range of every numeric flag of hps.add_vae_arguments
BAD_VALUE = {'seed': '-1', 'port': '70000', 'image_size': '0', 'image_channels': '2', 'ema_rate': '1.5', 'zdim': '0',
             'width': '0', 'bottleneck_multiple': '0', 'no_bias_above': '-1', 'warmup_iters': '-1',
             'num_mixtures': '0', 'grad_clip': '-2', 'skip_threshold': '0', 'lr': '-1', 'wd': 'nan',
             'num_epochs': '0', 'max_iters': '-5', 'n_batch': '0', 'valid_images': '-3', 'n_batch_eval': '-5',
             'adam_beta1': '1', 'adam_beta2': '-0.1', 'temperature': '0', 'iters_per_ckpt': '0',
             'iters_per_print': '0', 'iters_per_save': '0', 'iters_per_images': '0', 'epochs_per_eval': '0',
             'epochs_per_eval_save': '0', 'num_images_visualize': '0', 'num_variables_visualize': '-1',
             'num_temperatures_visualize': '5', 'num_workers': '-1', 'threads': '-1', 'warn_skipped': '0',
             'dist_timeout': '0', 'image_bits': '6', 'image_mean': 'nan', 'image_std': '0'}


def test_every_numeric_flag_is_covered():
    parser = hps.add_vae_arguments(argparse.ArgumentParser())
    assert {a.dest for a in parser._actions if a.type in (int, float)} == set(BAD_VALUE)


@pytest.mark.parametrize('flag', sorted(BAD_VALUE))
def test_out_of_range_number_is_one_line_naming_the_flag(flag):
    """Every numeric flag: a value outside its range is refused by get_hparams with one
    line naming the flag, the value and the allowed values."""
    with pytest.raises(UserError) as e:
        get_hparams(['--' + flag, BAD_VALUE[flag]])
    parser = hps.add_vae_arguments(argparse.ArgumentParser())
    value = next(a.type for a in parser._actions if a.dest == flag)(BAD_VALUE[flag])
    assert str(e.value) == f'--{flag} {value}: must be {hps.RANGES[flag][1]}'
    assert '\n' not in str(e.value)


def test_presets_pass_the_checks():
    from vae import check_hparams
    for name in hps.HPARAMS_REGISTRY:
        if name not in hps.SIZED_PRESETS:  # those need a dataset's size (tests/test_images.py checks them)
            check_hparams(hps.preset(name))  # the numbers, then the layer strings and widths


# Layer strings and widths that cannot build the tiny model (enc 28x1,28d2,14x1,14d2,7x1,7d7,1x1, dec
# 1x1,7m1,14m7,28m14, width 16): (flags, the token or value the line must name, the rule it must state).
BAD_ARCHITECTURE = [
    (['--dec_blocks', '1x1,14m7,28m14'], "'14m7'", 'no earlier decoder block has produced'),
    (['--dec_blocks', '1x1,7m14,14m7,28m14'], "'7m14'", 'S must be below R'),
    (['--dec_blocks', '1x1,7m1,7m7,14m7,28m14'], "'7m7'", 'S must be below R'),
    (['--dec_blocks', '1x1,7m1,14m7,7x1,28m14'], "'7x1'", 'must never decrease'),
    (['--dec_blocks', '1x1,7m1,14m7'], "'1x1,7m1,14m7'", 'must end at the image resolution 28'),
    (['--dec_blocks', '1x1,7m1,14d2,28m14'], "'14d2'", 'the decoder takes RxN, RmS and R'),
    (['--dec_blocks', '1x1,7m1,9x1,28m7'], "'9x1'", 'the encoder provides only [1, 7, 14, 28]'),
    (['--dec_blocks', '1x0,7m1,14m7,28m14'], "'1x0'", 'block count N of RxN = 0: it must be >= 1'),
    (['--enc_blocks', '28x-1,28d2,14x1,14d2,7x1,7d7,1x1'], "'28x-1'", 'block count N of RxN = -1'),
    (['--enc_blocks', '28d3,9x1,9d9,1x1', '--dec_blocks', '1x1,9m1,9x1,28m9'], "'28d3'", 'K of RdK must divide R'),
    (['--enc_blocks', '28x1,28d2,28x1,14d2,7x1,7d7,1x1'], "'28x1'", 'the encoder is at resolution 14 there'),
    (['--enc_blocks', '28x1,28m2,14x1,14d2,7x1,7d7,1x1'], "'28m2'", 'the encoder takes RxN, RdK and R'),
    (['--enc_blocks', '28x1,28d0,14x1'], "'28d0'", 'down rate K of RdK = 0'),
    (['--enc_blocks', '28x1,,28d2,14x1,14d2,7x1,7d7,1x1'], "''", 'expected RxN'),
    (['--enc_blocks', '28x2x1'], "'28x2x1'", 'expected RxN'),
    (['--custom_width_str', '14-64'], "'14-64'", 'resolution:width pairs of positive integers'),
    (['--custom_width_str', '14:0'], "'14:0'", 'resolution:width pairs of positive integers'),
    (['--custom_width_str', '14:8'], "'28d2'", 'cannot drop any'),
    (['--bottleneck_multiple', '0.01'], '--bottleneck_multiple 0.01', 'int(16 x 0.01) = 0'),
]


@pytest.mark.parametrize('flags,token,rule', BAD_ARCHITECTURE, ids=[' '.join(c[0]) for c in BAD_ARCHITECTURE])
def test_architecture_that_cannot_be_built_is_refused_before_any_data_is_read(tmp_path, capsys, flags, token,
                                                                                 rule):
    """train.py refuses each in one line naming the token and the rule, and does so before
    it reads data: --data_root points at a folder with no data at all."""
    argv = TINY + ['--data_root', str(tmp_path / 'no-data'), '--save_dir', str(tmp_path / 'runs'), '--desc', 'x',
                   '--max_iters', '2'] + flags
    err = exits_2(capsys, train.main, argv)
    assert token in err and rule in err, err
    assert not os.path.exists(tmp_path / 'runs')


@pytest.mark.parametrize('flags', [
    ['--n_batch', '0'], ['--n_batch', '-4'], ['--iters_per_save', '0'], ['--iters_per_print', '0'],
    ['--iters_per_images', '0'], ['--lr', '-1'], ['--num_workers', '-1'], ['--threads', '-1'],
    ['--max_iters', '-5'], ['--valid_images', '-3'], ['--ema_rate', '1.5'], ['--grad_clip', '-2'],
    ['--skip_threshold', '-0.5'], ['--num_epochs', '0'], ['--epochs_per_eval', '0'], ['--warmup_iters', '-1'],
    ['--n_batch_eval', '-5'], ['--zdim', '0'], ['--width', '0'], ['--port', '0'],
])
def test_train_bad_number_exits_2_and_writes_nothing(fmnist_root, tmp_path, capsys, flags):
    argv = TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path), '--desc', 'x', '--max_iters', '2'] + flags
    err = exits_2(capsys, train.main, argv)
    assert flags[0] in err and 'must be' in err
    assert os.listdir(tmp_path) == []


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / 'notes.txt').write_text('these are my notes\nnot a checkpoint\n')
    (tmp_path / 'one.th').write_bytes(b'x')
    shutil.copy(ref('tiny32', 'model.th'), tmp_path / 'weights.th')
    return tmp_path


@pytest.mark.parametrize('flag,name,expect,test_eval', [
    ('--restore_ema_path', 'notes.txt', 'not a PyTorch file', False),
    ('--restore_ema_path', 'one.th', 'not a PyTorch file', False),
    ('--restore_path', 'notes.txt', 'not a PyTorch file', False),
    ('--restore_log_path', 'weights.th', 'not a text file', False),
    ('--restore_ema_path', 'notes.txt', 'not a PyTorch file', True),
    ('--restore_ema_path', 'one.th', 'not a PyTorch file', True),
    ('--restore_path', 'notes.txt', 'not a PyTorch file', True),
])
def test_train_unreadable_file_exits_2_and_writes_nothing(fmnist_root, bad_files, capsys, flag, name, expect,
                                                          test_eval):
    runs = bad_files / 'runs'
    argv = TINY + ['--data_root', fmnist_root, '--save_dir', str(runs), '--desc', 'x', '--max_iters', '2',
                   flag, str(bad_files / name)] + (['--test_eval'] if test_eval else [])
    err = exits_2(capsys, train.main, argv)
    assert name in err and expect in err
    assert not os.path.exists(runs)


def test_refusal_of_code_does_not_advise_weights_only_false(fmnist_root, tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ('true',))
    torch.save({'x': Evil()}, tmp_path / 'evil.th')
    err = exits_2(capsys, train.main, TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path / 'runs'),
                                             '--restore_ema_path', str(tmp_path / 'evil.th')])
    assert 'refusing to load' in err and 'system' in err and 'could run code' in err
    assert 'weights_only' not in err and 'False' not in err


def test_train_in_read_only_save_dir_exits_2_and_writes_nothing(fmnist_root, tmp_path, capsys, monkeypatch):
    os.makedirs(tmp_path / 'runs')
    make_read_only(monkeypatch, tmp_path / 'runs')
    err = exits_2(capsys, train.main, TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path / 'runs'),
                                             '--desc', 'x', '--max_iters', '2'])
    assert 'cannot write to' in err and '--save_dir' in err
    assert os.listdir(tmp_path / 'runs') == []


def test_write_error_met_late_is_one_line(capsys):
    """A file system that turns read-only or full after the up-front checks: one line naming the file."""
    def main(argv):
        raise PermissionError(errno.EROFS, 'Read-only file system', '/runs/x/log.txt')
    err = exits_2(capsys, main, [])
    assert err.startswith('error: /runs/x/log.txt: Read-only file system; ') and '--save_dir' in err


def test_test_eval_of_a_read_only_run_prints_and_writes_nothing(tiny_run, tmp_path, capsys, monkeypatch):
    root, save = tiny_run
    ro = str(tmp_path / 'ro')
    shutil.copytree(save, ro)
    before = snapshot(ro)
    make_read_only(monkeypatch, ro)
    capsys.readouterr()
    stats = train.main(TINY + VIZ + ['--data_root', root, '--save_dir', ro, '--desc', 'r', '--test_eval'])
    out = capsys.readouterr().out
    assert stats['n_images'] == 300 and 'test elbo over 300 images' in out and 'read-only' in out
    assert snapshot(ro) == before


def test_sample_and_bench_bad_numbers(tiny_run, capsys):
    root, save = tiny_run
    err = exits_2(capsys, sample.main, ['--save_dir', save, '--desc', 'r', '--mode', 'uncond', '--n', '0'])
    assert err == 'error: --n 0: must be >= 1'
    for flags in (['--steps', '0'], ['--n_batch', '0'], ['--eval_steps', '0'], ['--repeat', '0']):
        err = exits_2(capsys, bench.main, ['--tiny', '--device', 'cpu'] + flags)
        assert err.startswith(f'error: {flags[0]} 0: must be >= 1')


def test_evaluate_bad_batch_exits_2_and_writes_nothing(tiny_run, tmp_path, capsys):
    root, save = tiny_run
    before = snapshot(save)
    err = exits_2(capsys, evaluate.main, ['--save_dir', save, '--desc', 'r', '--kl_stats', '--n_batch_eval', '-5',
                                          '--out_dir', str(tmp_path / 'out')])
    assert err == 'error: --n_batch_eval -5: must be >= 0 (0: 4 x n_batch)'
    assert snapshot(save) == before and not os.path.exists(tmp_path / 'out')


# ----------------------------------------------------------------------------- outputs

def test_evaluate_more_images_than_the_split_is_one_line(tiny_run, tmp_path, capsys):
    root, save = tiny_run
    err = exits_2(capsys, evaluate.main, ['--save_dir', save, '--desc', 'r', '--kl_stats', '--n_images', '20000',
                                          '--threads', '1', '--num_workers', '0', '--out_dir', str(tmp_path)])
    assert err == ('error: --n_images 20000: the test split of fashion_mnist has 300 images; pass at most 300, or 0 '
                   'for all of them')


def test_sample_out_suffix_decides_the_format(tiny_run, tmp_path, capsys):
    root, save = tiny_run
    base = ['--save_dir', save, '--desc', 'r', '--mode', 'uncond', '--n', '2', '--threads', '1']
    sample.main(base + ['--out', str(tmp_path / 'x.jpg')])
    sample.main(base + ['--out', str(tmp_path / 'x.png')])
    with Image.open(tmp_path / 'x.jpg') as im:
        assert im.format == 'JPEG' and im.size == (2 * 28, 28)
    with Image.open(tmp_path / 'x.png') as im:
        assert im.format == 'PNG'
    err = exits_2(capsys, sample.main, base + ['--out', str(tmp_path / 'x.pngg')])
    assert '--out' in err and '.pngg' in err
    assert not os.path.exists(tmp_path / 'x.pngg')


def test_sample_and_evaluate_only_read_a_read_only_run(tiny_run, tmp_path, capsys, monkeypatch):
    """With outputs elsewhere both tools work on a read-only run folder and write nothing
    into it; without, they say which flag puts the outputs elsewhere."""
    root, save = tiny_run
    ro = str(tmp_path / 'ro')
    shutil.copytree(save, ro)
    before = snapshot(ro)
    make_read_only(monkeypatch, ro)
    run = ['--save_dir', ro, '--desc', 'r', '--threads', '1', '--num_workers', '0', '--no_progress']
    out = sample.main(run + ['--mode', 'uncond', '--n', '2', '--out', str(tmp_path / 'u.png')])
    assert Image.open(out).size == (2 * 28, 28)
    st = evaluate.main(run + ['--kl_stats', '--n_images', '8', '--out_dir', str(tmp_path / 'ev')])
    assert st['n_images'] == 8 and os.path.exists(tmp_path / 'ev' / 'kl-test.json')
    err = exits_2(capsys, sample.main, run + ['--mode', 'uncond', '--n', '2'])
    assert 'cannot write to' in err and '--out' in err
    err = exits_2(capsys, evaluate.main, run + ['--kl_stats', '--n_images', '8'])
    assert 'cannot write to' in err and '--out_dir' in err
    assert snapshot(ro) == before


# ----------------------------------------------------------------------------- damaged or foreign files

def _flip_a_bit_in_the_largest_tensor(path):
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        n_name, n_extra = struct.unpack('<HH', f.read(4))
        pos = info.header_offset + 30 + n_name + n_extra + info.file_size // 2 + 3  # a float32's exponent byte
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ 0x40]))


def test_flipped_bit_is_caught_by_the_recorded_checksum(tiny_run, tmp_path, capsys):
    root, save = tiny_run
    shutil.copytree(save, tmp_path / 'copy')
    path = str(tmp_path / 'copy' / 'r' / 'latest-model-ema.th')
    _flip_a_bit_in_the_largest_tensor(path)
    arch = TINY[:TINY.index('--no_progress')]  # explicit architecture: only the damage may stop it
    err = exits_2(capsys, sample.main, arch + ['--restore_ema_path', path, '--mode', 'uncond', '--n', '2',
                                               '--out', str(tmp_path / 'u.png')])
    assert f'{path} is damaged' in err and 'latest-state.th' in err
    assert not os.path.exists(tmp_path / 'u.png')


def _rewrite_member(path, member, data):
    """Replace one member of a torch.save zip by ``data``, with a correct CRC (so the file is a
    sound zip whose content is wrong)."""
    with zipfile.ZipFile(path) as z:
        items = [(i, data if i.filename.endswith(member) else z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
        for info, content in items:
            z.writestr(info, content)


def test_damaged_files_are_named_with_what_failed(tiny_run, tmp_path, capsys):
    """Against the set's record: a flipped byte is a checksum failure, a cut file is truncated,
    and the warning says which files of the set are still good.  Without a record: a cut file
    is truncated, a zip whose bytes changed fails its checksum, a sound zip with bad pickled
    data cannot be unpickled; each message is whole (no sentence cut off)."""
    from checkpoints import safe_torch_load
    root, save = tiny_run
    shutil.copytree(save, tmp_path / 'copy')
    prefix = str(tmp_path / 'copy' / 'r' / 'latest')
    _flip_a_bit_in_the_largest_tensor(prefix + '-model-ema.th')
    os.truncate(prefix + '-opt.th', os.path.getsize(prefix + '-opt.th') // 2)
    capsys.readouterr()
    assert checkpoints.find_checkpoint(str(tmp_path / 'copy' / 'r')) == (None, None)
    warning = capsys.readouterr().out.strip()
    assert len(warning.splitlines()) == 1 and warning.startswith(f'warning: ignoring incomplete checkpoint {prefix}-*')
    assert 'latest-model-ema.th: checksum failure (same size, CRC' in warning
    assert 'latest-opt.th: truncated (' in warning
    assert warning.endswith('still good: latest-model.th, latest-log.jsonl')
    cases = {'cut': lambda p: os.truncate(p, os.path.getsize(p) // 3),
             'pkl_flipped': lambda p: _flip_byte_of_member(p, 'data.pkl'),
             'pkl_bad': lambda p: _rewrite_member(p, 'data.pkl', b'\x80\x02not a pickle')}
    expect = {'cut': 'it is truncated: ', 'pkl_flipped': 'it fails its checksum: ',
              'pkl_bad': 'its pickled data cannot be unpickled ('}
    for name, damage in cases.items():
        path = str(tmp_path / f'{name}.th')
        shutil.copy(os.path.join(save, 'r', 'latest-model.th'), path)
        damage(path)
        with pytest.raises(UserError) as e:
            safe_torch_load(path, 'state dict')
        msg = str(e.value)
        assert msg.startswith(f'cannot read state dict {path}: {expect[name]}'), msg
        assert '\n' not in msg and 'there is a high' not in msg and msg.endswith((')', 'finish)')), msg


def _flip_byte_of_member(path, member):
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member))
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        n_name, n_extra = struct.unpack('<HH', f.read(4))
        f.seek(info.header_offset + 30 + n_name + n_extra + 2)
        b = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([b ^ 0x01]))


def test_readers_use_an_intact_ema_file_and_say_what_is_damaged(tiny_run, tmp_path, capsys):
    """sample.py, evaluate.py and train.py --test_eval need only the EMA file of a set: with
    -model.th and -opt.th damaged (no complete set left) they use it and say so; with the
    newest EMA file damaged they fall back to an older set and say so; with none intact they
    name what is usable instead."""
    root, save = tiny_run
    rd = tmp_path / 'copy' / 'r'
    shutil.copytree(save, tmp_path / 'copy')
    suffixes = ['-model.th', '-model-ema.th', '-opt.th', '-log.jsonl', '-state.th']
    for suffix in suffixes:
        shutil.copy(rd / f'latest{suffix}', tmp_path / f'previous{suffix}')
    os.truncate(rd / 'latest-model.th', 1000)
    os.truncate(rd / 'latest-opt.th', 1000)
    draw = ['--save_dir', str(tmp_path / 'copy'), '--desc', 'r', '--mode', 'uncond', '--n', '2', '--threads', '1',
            '--out', str(tmp_path / 'u.png')]
    capsys.readouterr()
    sample.main(draw)
    out = capsys.readouterr().out
    assert f'EMA weights {rd}/latest-model-ema.th' in out and 'latest-opt.th: truncated (1,000 of' in out
    assert 'reading needs only the intact EMA file' in out and os.path.exists(tmp_path / 'u.png')
    stats = train.main(TINY + ['--data_root', root, '--save_dir', str(tmp_path / 'copy'), '--desc', 'r',
                               '--test_eval'])
    assert stats['n_images'] == 300 and f'evaluating EMA weights {rd}/latest-model-ema.th' in capsys.readouterr().out
    for suffix in suffixes:  # a second, older-named complete set
        shutil.copy(tmp_path / f'previous{suffix}', rd / f'previous{suffix}')
    _flip_a_bit_in_the_largest_tensor(rd / 'latest-model-ema.th')
    sample.main(draw)
    out = capsys.readouterr().out
    assert 'passing over checkpoint' in out and 'latest-model-ema.th: checksum failure' in out
    assert f'EMA weights {rd}/previous-model-ema.th' in out and 'not the newest weights of the run' in out
    _flip_a_bit_in_the_largest_tensor(rd / 'previous-model-ema.th')
    err = exits_2(capsys, evaluate.main, ['--save_dir', str(tmp_path / 'copy'), '--desc', 'r', '--kl_stats',
                                          '--out_dir', str(tmp_path / 'ev')])
    assert f'no intact EMA weights in {rd}' in err and f'--restore_path {rd}/previous-model.th' in err


def test_non_finite_values_without_a_record_are_refused(tiny_run, tmp_path, capsys):
    root, save = tiny_run
    sd = torch.load(os.path.join(save, 'r', 'latest-model-ema.th'), weights_only=True)
    sd['decoder.out_net.out_conv.weight'][0, 0] = float('inf')
    torch.save(sd, tmp_path / 'w.th')  # no -state.th beside it
    arch = TINY[:TINY.index('--no_progress')]
    err = exits_2(capsys, evaluate.main, arch + ['--restore_ema_path', str(tmp_path / 'w.th'), '--data_root', root,
                                                 '--kl_stats', '--n_images', '4', '--out_dir', str(tmp_path)])
    assert 'not finite' in err and 'decoder.out_net.out_conv.weight' in err and 'w.th' in err


def test_rgb_checkpoint_into_grayscale_model_names_the_channels(fmnist_root, tmp_path, capsys):
    """The tiny32 reference (cifar10, 3 channels) into the 1-channel fashion_mnist tiny model:
    one line, the image channels as the cause and the fix first, no block-string advice."""
    err = exits_2(capsys, train.main, TINY + ['--data_root', fmnist_root, '--save_dir', str(tmp_path / 'runs'),
                                             '--restore_path', ref('tiny32', 'model.th')])
    cause = err.split(';')[0]
    assert '3-channel images' in cause and '1-channel' in cause and 'encoder.in_conv.weight' in cause
    assert '--hps' in err.split(';')[1] and '--enc_blocks' not in err and '--dec_blocks' not in err
    assert not os.path.exists(tmp_path / 'runs')


def test_mismatch_message_is_one_line_with_the_cause_first():
    """Same channels, two encoder blocks fewer in the file: the block counts lead, the fix
    follows, then the details."""
    from vae import VAE, parse_layer_string
    H = hps.preset('cifar10', width=32, zdim=4, num_mixtures=3)
    with torch.device('meta'):
        model = VAE(H)
        other = VAE(hps.preset('cifar10', width=32, zdim=4, num_mixtures=3,
                               enc_blocks=H.enc_blocks.replace('32x11', '32x9'))).state_dict()
    n = len(parse_layer_string(H.enc_blocks))
    msg = describe_mismatch(model, other, 'x.th', H)
    parts = msg.split('; ')
    assert '\n' not in msg
    assert f'The file has {n - 2} encoder blocks' in parts[0] and parts[0].endswith(f'builds {n}')
    assert parts[1].startswith('pass --enc_blocks') and 'missing from the file' in msg


# ----------------------------------------------------------------------------- the run's own configuration

def test_readme_commands_read_the_runs_data_root(tiny_run, tmp_path):
    """sample.py --hps fashion_mnist_quick --desc D --mode grid and evaluate.py --desc D
    --kl_stats, without --data_root: the run's saved data_root and architecture are used."""
    root, save = tiny_run
    out = sample.main(['--hps', 'fashion_mnist_quick', '--save_dir', save, '--desc', 'r', '--mode', 'grid',
                       '--out', str(tmp_path / 'g.png'), '--threads', '1'])
    assert Image.open(out).size == (3 * 28, (1 + 2 + 1) * 28)  # the run's grid settings, not the preset's
    st = evaluate.main(['--save_dir', save, '--desc', 'r', '--kl_stats', '--n_images', '8', '--threads', '1',
                        '--num_workers', '0', '--no_progress', '--out_dir', str(tmp_path / 'ev')])
    assert st['n_images'] == 8 and st['dataset'] == 'fashion_mnist' and len(st['blocks']) == 4


def test_explicit_flags_win_over_the_run(tiny_run, tmp_path, capsys):
    root, save = tiny_run
    out = sample.main(['--save_dir', save, '--desc', 'r', '--mode', 'grid', '--num_images_visualize', '2',
                       '--out', str(tmp_path / 'g.png'), '--threads', '1'])
    assert Image.open(out).size == (2 * 28, (1 + 2 + 1) * 28)
    err = exits_2(capsys, sample.main, ['--save_dir', save, '--desc', 'r', '--mode', 'grid', '--data_root',
                                        str(tmp_path), '--out', str(tmp_path / 'h.png')])
    assert str(tmp_path) in err  # the given --data_root, which holds no data, was used


def test_run_config_keeps_the_process_settings_of_this_command():
    H = get_hparams(['--desc', 'now'])
    saved = dict(get_hparams(['--hps', 'cifar10', '--device', 'cuda', '--restore_path', 'x.th', '--threads', '7']))
    changed = hps.apply_run_config(H, saved, {'desc'})
    assert H.dataset == 'cifar10' and H.width == 384 and H.image_channels == 3
    assert H.device == 'auto' and H.restore_path is None and H.threads == 0 and H.desc == 'now'
    assert 'device' not in changed and 'dataset' in changed


# ----------------------------------------------------------------------------- one vocabulary

def test_sample_and_evaluate_share_list_flags_and_default_split():
    s = sample.parse(['--mode', 'recon', '--indices', '0,1', '2', '--keep', '1', '3,5'])
    e = evaluate.parse_args(['--reconstruct', '--indices', '0,1', '2', '--keep', '1', '3,5'])
    assert s.indices == e.indices == [0, 1, 2]
    assert s.keep == e.keep == [1, 3, 5]
    assert s.split == e.split == 'test'
    s = sample.parse(['--mode', 'recon', '--indices', '0', '1', '--k', '2', '4'])  # the old spellings still work
    e = evaluate.parse_args(['--reconstruct', '--indices', '0', '1', '--k', '2,4'])
    assert s.indices == e.indices == [0, 1] and s.keep == e.keep == [2, 4]
    assert sample.parse(['--out_dir', 'pics', '--mode', 'uncond']).out_path == os.path.join('pics', 'uncond.png')


def test_sample_script_exits_2_with_one_line():
    """The real script: a bad number gives exit status 2 and one line, before torch builds anything."""
    p = subprocess.run([sys.executable, 'sample.py', '--n', '-1', '--mode', 'uncond'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == 'error: --n -1: must be >= 1'


def _can_mount_read_only(tmp_path):
    if shutil.which('unshare') is None:
        return False
    probe = tmp_path / 'probe'
    probe.mkdir()
    p = subprocess.run(['unshare', '-m', 'sh', '-c', f'mount --bind {probe} {probe} && '
                        f'mount -o remount,bind,ro {probe} && ! touch {probe}/x'], capture_output=True)
    return p.returncode == 0


def test_real_read_only_mount(tiny_run, tmp_path):
    """The same through a read-only bind mount of the run folder (where this machine allows
    one): train.py refuses in one line, sample.py with --out elsewhere draws, nothing changes."""
    if not _can_mount_read_only(tmp_path):
        pytest.skip('no mount namespace for a read-only bind mount here')
    root, save = tiny_run
    ro = tmp_path / 'ro'
    shutil.copytree(save, ro)
    before = snapshot(ro)
    py = sys.executable
    script = (f'mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} || exit 99\n'
              f'{py} train.py {" ".join(TINY)} --data_root {root} --save_dir {ro} --desc r --max_iters 4 '
              f'2>{tmp_path}/train.err; echo $? > {tmp_path}/train.rc\n'
              f'{py} sample.py --save_dir {ro} --desc r --mode uncond --n 2 --threads 1 --out {tmp_path}/u.png')
    p = subprocess.run(['unshare', '-m', 'sh', '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    err = (tmp_path / 'train.err').read_text().strip()
    assert (tmp_path / 'train.rc').read_text().strip() == '2'
    assert err == f'error: cannot write to {ro}/r: it is read-only (or not a folder); pass a --save_dir this ' \
                  'process can write to'
    assert Image.open(tmp_path / 'u.png').size == (2 * 28, 28)
    assert snapshot(ro) == before


def test_code_points_only_at_files_the_repository_holds():
    """Scripts and tests cite no document outside the repository: no specification
    sections, no folder beside the clone, and every reference/ file they name exists."""
    import re
    spec, outside = 'SPEC' + ' \u00a7', '..' + '/shared'
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('data', 'saved_models', '__pycache__')]
        for name in files:
            if not name.endswith(('.py', '.sh')):
                continue
            path = os.path.join(folder, name)
            text = open(path, encoding='utf-8').read()
            assert spec not in text and outside not in text, path
            for cited in re.findall(r'reference/([\w.]+\.(?:md|json))', text):
                assert os.path.exists(os.path.join(ROOT, 'tests', 'reference', cited)), (path, cited)

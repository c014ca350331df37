"""A power cut between the renames of a save, for crash tests: Python imports this module at
start-up in every process whose PYTHONPATH holds this folder, and with
KILL_AFTER_RENAME=NAME:K the process SIGKILLs itself right after the K-th os.replace onto a
file called NAME (e.g. latest-opt.th:3).  utils.atomic_write renames with os.replace, so the
kill lands exactly where a crash of a real save would.

    PYTHONPATH=tests/kill_after_rename KILL_AFTER_RENAME=latest-opt.th:3 python train.py ...
"""
import os
import signal

_name, _k = os.environ.get('KILL_AFTER_RENAME', ':0').rsplit(':', 1)
_replace, _renames = os.replace, [0]


def _replace_then_die(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    if os.path.basename(os.fspath(dst)) == _name:
        _renames[0] += 1
        if _renames[0] == int(_k):
            os.kill(os.getpid(), signal.SIGKILL)


if _name:
    os.replace = _replace_then_die

"""Start a command as `srun -n N` starts the tasks of a job step on one node, for tests of
SLURM launches on a machine without SLURM: N copies, each with the SLURM_* variables srun
gives its task (rank, step size, node-local rank, the step's node list), and no MPI or
torchrun variables.  Waits for all of them; exits with the first non-zero status (a task
killed by signal S counts as 128 + S).  SIGTERM and SIGINT are passed on to every task.

    python tests/fake_srun.py -n 2 [--nodelist 'localhost,node[02-03]'] python train.py ...
"""
import argparse
import os
import signal
import subprocess
import sys

DROP = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'PMI_RANK', 'PMI_SIZE', 'PMIX_RANK',
        'MPI_LOCALNRANKS', 'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_LOCAL_SIZE')


def task_env(task, tasks, nodelist, base=os.environ):
    env = {k: v for k, v in base.items() if k not in DROP and not k.startswith('SLURM_')}
    env.update(SLURM_JOB_ID='1', SLURM_STEP_ID='0', SLURM_PROCID=str(task), SLURM_LOCALID=str(task),
               SLURM_NODEID='0', SLURM_NTASKS=str(tasks), SLURM_STEP_NUM_TASKS=str(tasks),
               SLURM_STEP_NUM_NODES='1', SLURM_STEP_NODELIST=nodelist, SLURM_JOB_NODELIST=nodelist,
               SLURM_STEP_TASKS_PER_NODE=str(tasks))
    return env


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('-n', type=int, required=True, help='tasks')
    p.add_argument('--nodelist', default='localhost', help='SLURM_STEP_NODELIST; its first host runs task 0')
    p.add_argument('command', nargs=argparse.REMAINDER)
    a = p.parse_args()
    procs = [subprocess.Popen(a.command, env=task_env(i, a.n, a.nodelist)) for i in range(a.n)]

    def forward(signum, frame):
        for q in procs:
            if q.poll() is None:
                q.send_signal(signum)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [q.wait() for q in procs]
    sys.exit(next((c if c > 0 else 128 - c for c in codes if c), 0))


if __name__ == '__main__':
    main()

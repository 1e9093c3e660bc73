"""torchrun (torch.distributed.run) for torchrun_node.sh, with a one-line failure report.

torchrun ends a failed run with a ChildFailedError traceback and a table of the failed workers,
after the workers' own errors (megamoe prints a user error as one line), and always exits 1.
This runs the same launcher with the same arguments; when a worker fails it prints one line
naming the worker that failed first and exits with that worker's exit code, so that a config
error ends the job with exit code 2 under torchrun as under srun.

    python examples/slurm/launch_torchrun.py [torchrun options] -m megamoe train ...
"""

from __future__ import annotations

import socket
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def shell_code(exitcode: int) -> int:
    """A worker's exit status as a shell reports it: killed by signal N (-N) -> 128 + N."""
    return exitcode if exitcode >= 0 else 128 - exitcode


def failure_line(err: ChildFailedError, host: str) -> tuple[str, int]:
    """(one line about the first failed worker, the exit code to end with)."""
    # The failures are the workers that ended on their own; torchrun stops the others after.
    rank, failure = err.get_first_failure()
    code = shell_code(failure.exitcode)
    how = (f"exit code {code}" if failure.exitcode >= 0
           else f"signal {-failure.exitcode} (exit code {code})")
    return (f"torchrun [{host}]: worker rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) "
            f"failed first, with {how}; its error is in its own output above"), code


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    host = socket.gethostname()
    try:
        run(args)
    except ChildFailedError as err:
        line, code = failure_line(err, host)
        print(line, file=sys.stderr, flush=True)
        return code
    except SignalException as err:   # TERM (scancel, time limit): the workers saved and ended
        print(f"torchrun [{host}]: stopped by {err.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Entry-point wrapper: user errors print one clear line and exit 2, not a stack trace;
a `--validate_only` run prints its data report (rank 0) and exits 0; a preempted stage
(SIGTERM/SIGUSR1, checkpoint saved) exits PREEMPTED_EXIT_CODE (75)."""
from __future__ import annotations

import os
import sys

from common.errors import PREEMPTED_EXIT_CODE, DensehfError, Preempted, ValidationDone


def run_main(main, exit_process: bool = False) -> None:
    """exit_process: the stage is the whole program (its `__main__`): after a clean finish the
    process ends without the interpreter's teardown (`close_distributed(skip_finalizers=True)`),
    unless something needs it (`before_close(..., needs_teardown=True)`)."""
    from common.logger import setup_logging
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    try:
        main()
    except ValidationDone as done:
        if rank == 0:
            print(done.report, flush=True)
    except DensehfError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as p:
        if rank == 0:
            print(f"preempted: {p}", file=sys.stderr, flush=True)
        from common.strategy import close_distributed
        close_distributed()
        sys.exit(PREEMPTED_EXIT_CODE)
    from common.strategy import close_distributed
    close_distributed(skip_finalizers=exit_process)

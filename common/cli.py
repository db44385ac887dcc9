"""Entry-point wrapper: user errors print one clear line and exit 2, not a stack trace;
a `--validate_only` run prints its data report (rank 0) and exits 0."""
from __future__ import annotations

import os
import sys

from common.errors import DensehfError, ValidationDone


def run_main(main) -> None:
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
    from common.strategy import close_distributed
    close_distributed()

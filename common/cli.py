"""Entry-point wrapper: user errors print one clear line and exit 2, not a stack trace."""
from __future__ import annotations

import os
import sys

from common.errors import DensehfError


def run_main(main) -> None:
    from common.logger import setup_logging
    setup_logging(int(os.environ.get("RANK", "0")))
    try:
        main()
    except DensehfError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from common.strategy import close_distributed
    close_distributed()

"""Installed in Ray worker processes by the cluster tests and walk-through (`worker_process_setup_hook`): opening
anything under the folders listed in DRIVER_ONLY fails, as on a node that does not have the driver's files."""

import os
import sys


def install() -> None:
    """Refuse, from now on in this process, every open of a path under DRIVER_ONLY (os.pathsep-separated)."""
    hidden = tuple(os.environ["DRIVER_ONLY"].split(os.pathsep))

    def refuse(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            if os.path.abspath(os.fsdecode(args[0])).startswith(hidden):
                raise PermissionError(f"{args[0]} is on the driver only")

    sys.addaudithook(refuse)

"""prefect.yaml's pull step: find the project directory on the machine that runs the flow.

A deployment's flow run starts in a worker's process, on a plain checkout or in the image, and
loads `pipelines/flows.py` relative to its working directory. The directory is, first found:

1. `REGDPO_HOME` in the worker's environment (the image sets /opt/regdpo);
2. `checkout`, the checkout `regdpo deploy` ran from (`{{ $REGDPO_CHECKOUT }}` in prefect.yaml,
   filled in at deploy time), when it exists on this machine;
3. the checkout this Python environment runs `pipelines` from (an editable install).

Imported by the worker before the flow, so it imports nothing heavy (no prefect, no torch).
"""

from __future__ import annotations

import os
from pathlib import Path

MARKER = Path("pipelines") / "flows.py"


def _is_project(path: str | Path | None) -> bool:
    # An unset {{ $VAR }} placeholder stays in the text as is: not a directory, skipped.
    return bool(path) and "{{" not in str(path) and (Path(str(path)) / MARKER).is_file()


def project_dir(checkout: str | None = None) -> Path:
    """The project directory by the order in the module docstring; a clear error if none fits."""
    home = os.environ.get("REGDPO_HOME")
    if home:
        if not _is_project(home):
            raise FileNotFoundError(
                f"REGDPO_HOME={home} has no {MARKER}: point REGDPO_HOME at the regdpo project "
                "directory on this worker (a checkout, or /opt/regdpo in the image), or unset it")
        return Path(home).resolve()
    if _is_project(checkout):
        return Path(str(checkout)).resolve()
    installed = Path(__file__).resolve().parents[1]
    if _is_project(installed):
        return installed
    raise FileNotFoundError(
        f"no regdpo project directory on this worker: the deploying checkout {checkout!r} is not here and "
        f"this environment's regdpo is not a checkout; set REGDPO_HOME to the project directory in the "
        "worker's environment (see infra/README.md)")


def set_project_dir(checkout: str | None = None) -> dict[str, str]:
    """Pull step: chdir into the project directory; returns it as {"directory": ...} for later steps."""
    directory = project_dir(checkout)
    os.chdir(directory)
    return {"directory": str(directory)}

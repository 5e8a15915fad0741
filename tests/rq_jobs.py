"""Jobs that tests hand to a real rq worker: importable by name in its work horse, importing nothing
themselves."""
import sys


def imported(module: str) -> bool:
    """Whether the work horse running this job had ``module`` imported before the job started."""
    return module in sys.modules

"""``search-service``: read settings from the environment, then serve with uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from service.settings import Settings


def app_factory():
    """For ``uvicorn --factory service.main:app_factory`` (and worker processes)."""
    from service.app import create_app

    return create_app(Settings())  # type: ignore[call-arg]


def main() -> int:
    """Entry point of the ``search-service`` console script."""
    try:
        settings = Settings()  # type: ignore[call-arg]
    except ValidationError as exc:
        lines = [f"  AQE_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
                 for e in exc.errors()]
        print("search-service: invalid configuration:\n" + "\n".join(lines), file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run("service.main:app_factory", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=settings.log_level.lower(),
                access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

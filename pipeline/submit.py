"""`python -m pipeline.submit [--address URL] -- CMD...`: see `pipeline.jobs.submit`."""
import sys

from pipeline.jobs.submit import main

if __name__ == "__main__":
    sys.exit(main())

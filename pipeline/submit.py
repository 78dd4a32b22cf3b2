"""`python -m pipeline.submit [--address URL] -- CMD...`: see `pipeline.jobs.submit`;
`... --exp [NAME:]K=V[,K=V...] ... [--queue] --git-remote URL [-- dvc exp run TARGETS]`
(many experiments at once): see `pipeline.jobs.experiments`."""
import sys

from pipeline.jobs.submit import main

if __name__ == "__main__":
    sys.exit(main())

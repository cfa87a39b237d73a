"""Train a lit_nas model: ``python train.py fit --config quickstart.yaml`` (see README).

``python train.py check FILE`` builds each command line of the JSON list in FILE without training and prints
their errors (what ``python study.py`` runs before a study's first trial).
"""

import sys

import lit_nas  # noqa: F401  (first: makes torchvision importable next to a CPU torch)
from lit_nas_cli import check_main, main

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "check":
        check_main(sys.argv[2])
    else:
        main()

"""Train a lit_nas model: ``python train.py fit --config quickstart.yaml`` (see README)."""

import lit_nas  # noqa: F401  (first: makes torchvision importable next to a CPU torch)
from lit_nas_cli import main

if __name__ == "__main__":
    main()

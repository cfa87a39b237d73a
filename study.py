"""Run, follow and report studies: ``python study.py {run,status,report,retime} studies/NAME.yaml``.

A study is a grid of settings x seeds against plain baselines (see ``lit_nas_study``); ``--help`` lists each
command's options.
"""

import sys

import lit_nas  # noqa: F401  (first: makes torchvision importable next to a CPU torch)
from lit_nas_study.__main__ import main

if __name__ == "__main__":
    sys.exit(main())

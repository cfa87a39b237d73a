"""``python -m lit_nas.study ...``: the old command, kept as an alias of ``python study.py ...``.

It starts ``study.py`` in its place (``exec``) rather than importing it: the core imports nothing above it.
"""

import os
import sys

from lit_nas.paths import REPO_ROOT

if __name__ == "__main__":
    print("note: studies moved; this runs python study.py " + " ".join(sys.argv[1:]), file=sys.stderr)
    os.execv(sys.executable, [sys.executable, str(REPO_ROOT / "study.py"), *sys.argv[1:]])

"""Studies: a grid of settings x seeds against baseline families, run as ``train.py`` trials, then reported.

``python study.py run studies/NAME.yaml`` runs (or resumes) one; ``status`` counts its trials; ``report``
writes its tables and Pareto plots; ``retime`` times its networks again in one quiet run. See
:mod:`lit_nas_study.spec` for the YAML, :mod:`lit_nas_study.runner` for where files go.

The package sits above the core, beside the CLI: it reads the callback keys from :mod:`callbacks` and times
networks with :mod:`device_bench`, but trains nothing in its own process: each trial is a ``train.py fit``.
"""

from lit_nas_study.spec import StudySpec, StudySpecError, Trial

__all__ = ["StudySpec", "StudySpecError", "Trial"]

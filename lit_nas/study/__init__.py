"""Studies: a grid of settings x seeds against baseline families, run as ``train.py`` trials, then reported.

``python -m lit_nas.study run studies/NAME.yaml`` runs (or resumes) one; ``report`` writes its tables and
Pareto plots. See :mod:`lit_nas.study.spec` for the YAML, :mod:`lit_nas.study.runner` for where files go.
The study never imports the training code: each trial is its own ``train.py fit`` process.
"""

from lit_nas.study.spec import StudySpec, StudySpecError, Trial

__all__ = ["StudySpec", "StudySpecError", "Trial"]

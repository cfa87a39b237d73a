"""MkDocs hook: the study write-ups and their plots join the site where they live (``studies/results/``).

A write-up stays beside the records and report it describes, so it is reviewed with them; this hook adds
those files to the site under the same path, so pages link to ``studies/results/NAME/README.md``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

#: the files of each study's results folder that the site shows
SHOWN = ("README.md", "*.png")


def on_files(files: Files, config) -> Files:
    """Add ``studies/results/*/README.md`` and the plots beside them."""
    root = Path(config["config_file_path"]).resolve().parent  # the checkout: mkdocs.yml lies there
    for pattern in SHOWN:
        for path in sorted((root / "studies" / "results").glob(f"*/{pattern}")):
            rel = path.relative_to(root).as_posix()
            files.append(File(rel, str(root), config["site_dir"], config["use_directory_urls"]))
    return files

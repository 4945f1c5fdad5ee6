"""Sphinx configuration: MyST Markdown pages, API reference from the
docstrings, Graphviz diagrams rendered at build time from docs/*.dot.
tests/test_docs.py builds with -W (warnings are errors) and runs every
Python snippet of every page."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "comet"
author = "the comet developers"
copyright = "2026, the comet developers"
# One version source: comet/__init__.py (setup.py reads it too).
import comet  # noqa: E402

release = version = comet.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.graphviz", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
graphviz_output_format = "svg"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
html_static_path = []
html_title = "comet"
suppress_warnings = ["myst.xref_missing"]

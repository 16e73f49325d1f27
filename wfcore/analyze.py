"""Moved to ``wfcore.tools.analyze``; the old path warns for one release."""

from wfcore.errors import moved

moved(__name__, "wfcore.tools.analyze")

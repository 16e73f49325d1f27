"""Moved to ``wfcore.tools.exact``; the old path warns for one release."""

from wfcore.errors import moved

moved(__name__, "wfcore.tools.exact")

"""Moved to ``wfcore.plugins.woodfisher.algebra``; the old path warns for one release."""

from wfcore.errors import moved

moved(__name__, "wfcore.plugins.woodfisher.algebra")

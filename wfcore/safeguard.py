"""Moved to ``wfcore.run.safeguard``; the old path warns for one release."""

from wfcore.errors import moved

moved(__name__, "wfcore.run.safeguard")

"""Moved to ``wfcore.run.structured_run``; the old path warns for one release."""

from wfcore.errors import moved

moved(__name__, "wfcore.run.structured_run")

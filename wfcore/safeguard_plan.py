"""Moved to ``wfcore.run.safeguard_plan``; the old path warns for one release."""

from wfcore.errors import moved

moved(__name__, "wfcore.run.safeguard_plan")

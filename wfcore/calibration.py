"""Moved to ``wfcore.run.calibration``; the old path warns for one release."""

from wfcore.errors import moved

moved(__name__, "wfcore.run.calibration")

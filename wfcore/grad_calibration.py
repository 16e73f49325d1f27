"""Moved to ``wfcore.fisher.grad_calibration``; the old path warns for one release."""

from wfcore.errors import moved

moved(__name__, "wfcore.fisher.grad_calibration")

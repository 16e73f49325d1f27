"""Moved to ``wfcore.fisher.plan``; the old path warns for one release."""

from wfcore.errors import moved

moved(__name__, "wfcore.fisher.plan")

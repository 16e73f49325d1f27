"""Moved to ``wfcore.fisher.shared_store``; the old path warns for one release."""

from wfcore.errors import moved

moved(__name__, "wfcore.fisher.shared_store")

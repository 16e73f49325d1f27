"""Moved to ``wfcore.fisher.store_writer``; the old path warns for one release."""

from wfcore.errors import moved

moved(__name__, "wfcore.fisher.store_writer")

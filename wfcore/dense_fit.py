"""Moved to ``wfcore.run.dense_fit``; the old path warns for one release."""

from wfcore.errors import moved

moved(__name__, "wfcore.run.dense_fit")

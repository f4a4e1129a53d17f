"""Helpers shared by the tests: tiny real MDS data, small models, recording scorers,
Composer set-up and the entry points of spawned processes.

Modules that spawned processes import (``scorers``, ``distributed``) import nothing from
mosaicml-streaming at module level, so those processes start quickly.
"""

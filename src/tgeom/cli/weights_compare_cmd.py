"""``tgeom weights validate|align|stitch|diff``: comparisons across parameters and models [DAR]."""

from __future__ import annotations

from tgeom.cli.weights_cmd import weights_app  # noqa: F401

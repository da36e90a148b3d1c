"""Build hook: ``maildrop.1``, the man page, made from the argument parser at build time.

hatchling runs this for every wheel (also an editable one): it writes the page into the
build folder and ships it as shared data, so pip installs it as ``share/man/man1/maildrop.1``
under the environment's prefix (``/usr/local`` for a system pip, the venv otherwise). It
costs nothing at run time: the package never reads it.

Needs only ``argparse-manpage`` (in ``[build-system] requires``) and ``maildrop/cli.py``,
imported from the source tree: ``maildrop.cli`` imports only the stdlib and maildrop's own
stdlib-only modules at module level (for start-up time too), so the build needs none of the
runtime dependencies. A cli.py that imports more at module level fails the build here, with
the ImportError, rather than shipping a wheel without a man page.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MAN_PAGE = "share/man/man1/maildrop.1"


def render_man_page(root: Path) -> str:
    """The roff text of ``maildrop(1)`` for the source tree at ``root``: every option and
    command of ``maildrop.cli.build_parser()``, plus EXIT STATUS from cli.py's docstring."""
    from argparse_manpage.manpage import Manpage

    sys.path.insert(0, str(root))
    try:
        from maildrop import __version__, cli
    finally:
        sys.path.remove(str(root))
    parser = cli.build_parser()
    page = Manpage(parser, _data={"project_name": "maildrop", "version": __version__,
                                  "manual_title": "maildrop manual",
                                  "description": parser.description.rstrip(".")})
    doc = cli.__doc__ or ""
    statuses = next((p for p in doc.split("\n\n") if p.startswith("Exit statuses:")), "")
    if statuses:
        page.add_section("exit status", ">", " ".join(statuses.split()).removeprefix("Exit statuses: "))
    page.add_section("see also", ">", "The README (configuration, operation, troubleshooting) "
                     "and docs/ in the source distribution.")
    return str(page)


class ManPageHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        self._tmp = tempfile.mkdtemp(prefix="maildrop-man-")
        out = Path(self._tmp) / "maildrop.1"
        out.write_text(render_man_page(Path(self.root)))
        build_data["shared_data"][str(out)] = MAN_PAGE

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

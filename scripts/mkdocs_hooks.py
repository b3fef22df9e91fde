"""mkdocs hooks: pages kept beside their code outside docs/ become part of the site.

The docs link to them as GitHub shows the repository (`../examples/order_inventory/README.md`
from docs/index.md). On the site the same files live under the site root, so each relative
link is resolved against the file it is written in and rewritten to the page it reaches.
A link that reaches no page is left alone, for `mkdocs build --strict` to report.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
# Repository files outside docs/ that are pages of the site, at the same relative path.
EXTRA_PAGES = ("examples/order_inventory/README.md", "benchmarks/README.md")
LINK = re.compile(r"(\]\()([^)\s]+)(\))")
FENCE = re.compile(r"^\s*(```|~~~)")


def on_files(files: Files, config: Any) -> Files:
    for path in EXTRA_PAGES:
        files.append(File(path, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def _site_uri(target: Path, docs_dir: Path) -> str | None:
    if target.is_relative_to(docs_dir):
        return target.relative_to(docs_dir).as_posix()
    relative = target.relative_to(ROOT).as_posix() if target.is_relative_to(ROOT) else None
    return relative if relative in EXTRA_PAGES else None


def _rewrite(link: str, page: Page, docs_dir: Path) -> str:
    if re.match(r"^[a-z][a-z0-9+.-]*:|^[#/]", link):
        return link  # absolute URL, mailto:, in-page anchor or site-absolute path
    path, hash_, fragment = link.partition("#")
    source = Path(page.file.abs_src_path or "")
    target = Path(posixpath.normpath((source.parent / path).as_posix()))
    uri = _site_uri(target, docs_dir)
    if uri is None:
        return link
    here = posixpath.dirname(page.file.src_uri) or "."
    return posixpath.relpath(uri, here) + hash_ + fragment


def on_page_markdown(markdown: str, page: Page, config: Any, files: Files) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    lines = []
    in_fence = False
    for line in markdown.splitlines(keepends=True):
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            line = LINK.sub(lambda m: m[1] + _rewrite(m[2], page, docs_dir) + m[3], line)
        lines.append(line)
    return "".join(lines)

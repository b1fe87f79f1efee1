"""MkDocs hook: render the reST roles used in docstrings as plain code.

Docstrings say ``:class:`StateStore``` (readable in ``help()`` and in editors);
mkdocstrings renders Markdown, which would show the role literally. This turns
``:class:<code>~pkg.Name</code>`` into ``<code>Name</code>`` and a paragraph's
closing ``::`` (the reST "literal block follows" marker) into ``:``.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj|const):<code>(~?)([^<]*)</code>")
_LITERAL_MARKER = re.compile(r"::</p>")


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    """Rewrite the roles in a rendered page."""
    return _LITERAL_MARKER.sub(":</p>", _ROLE.sub(_role, html))


def on_config(config: Any, **kwargs: Any) -> Any:
    """Show the package's version next to the site name (read from the package itself)."""
    from statekeep import __version__

    config["site_name"] = f"{config['site_name']} {__version__}"
    return config

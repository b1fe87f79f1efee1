"""MkDocs hook: render the reST roles used in docstrings as plain code.

Docstrings say ``:class:`StateStore``` (readable in ``help()`` and in editors);
mkdocstrings renders Markdown, which would show the role literally. This turns
``:class:<code>~pkg.Name</code>`` into ``<code>Name</code>`` and a paragraph's
closing ``::`` (the reST "literal block follows" marker) into ``:``.

It also keeps private names out of the API page: a "Bases:" line naming only private
classes (a mixin such as ``_Combinable``) is dropped, and a private default in a
signature (``max_keep=_DEFAULT_MAX_KEEP``, a sentinel ``int``) shows its value.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj|const):<code>(~?)([^<]*)</code>")
_LITERAL_MARKER = re.compile(r"::</p>")
_PRIVATE_BASES = re.compile(
    r'<p class="doc doc-class-bases">\s*Bases:\s*'
    r'(?:<code><span title="[\w.]+\._\w+">_\w+</span></code>(?:,\s*)?)+</p>'
)
_PRIVATE_DEFAULT = re.compile(
    r'<span class="n">_DEFAULT_MAX_KEEP</span>'
    r'|<span title="statekeep\._keeper\._DEFAULT_MAX_KEEP">_DEFAULT_MAX_KEEP</span>'
)


def _private_default(match: re.Match[str]) -> str:
    from statekeep import _keeper

    return f'<span class="mi">{int(_keeper._DEFAULT_MAX_KEEP)}</span>'


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    """Rewrite the roles in a rendered page."""
    return _LITERAL_MARKER.sub(":</p>", _ROLE.sub(_role, html))


def on_post_page(output: str, **kwargs: Any) -> str:
    """Drop private names from the finished page (cross-references are resolved by now)."""
    output = _PRIVATE_BASES.sub("", output)
    return _PRIVATE_DEFAULT.sub(_private_default, output)


def on_config(config: Any, **kwargs: Any) -> Any:
    """Show the package's version next to the site name (read from the package itself)."""
    from statekeep import __version__

    config["site_name"] = f"{config['site_name']} {__version__}"
    return config

"""How a site is named beyond its walls: a short label the hospital sets, never a path.

Every reply of a site carries its name (``SiteConfig.announced_name``), a failed one at the
head of its one-line reason, so the coordinator's console, metrics, report and privacy
report say which hospital answered, failed or went silent, not only a node number.
"""

from __future__ import annotations

import re

#: Letters (any script), digits, spaces, dots, dashes, apostrophes and underscores, 1–64
#: of them, starting with a letter or digit: enough for "hospital-b", "St Mary's 2" or
#: "Hôpital Nord", too little for a path or a record.
SITE_NAME = re.compile(r"[^\W_][\w .'-]{0,63}")
#: The config record of a reply that names its site, and its one key.
SITE_RECORD, SITE_NAME_KEY = "site", "name"
#: A legacy (SecAgg+ path) reply has no record of its own for it: its metrics carry the name
#: under this key, the one value there that is text (the audit checks it is a site label).
LEGACY_SITE_NAME_KEY = "site-name"
_NAMED_REASON = re.compile(r"\[(" + SITE_NAME.pattern + r")\] (.*)", re.DOTALL)


def is_site_name(text: object) -> bool:
    """Whether ``text`` may travel as a site's name."""
    return isinstance(text, str) and SITE_NAME.fullmatch(text) is not None


def named_reason(site_name: str, reason: str) -> str:
    """A failed reply's reason headed by the site's name ('[hospital-b] privacy budget: …')."""
    return f"[{site_name}] {reason}" if is_site_name(site_name) else reason


def reason_site(reason: str) -> tuple[str, str]:
    """(site name, the rest) of a reason ``named_reason`` made; ('', reason) of any other."""
    found = _NAMED_REASON.fullmatch(reason)
    return (found.group(1), found.group(2)) if found else ("", reason)


def site_label(node: int, site_name: str = "") -> str:
    """How the coordinator names a site: 'hospital-b (node 12…)', or 'node 12…' unnamed."""
    return f"{site_name} (node {node})" if site_name else f"node {node}"


#: What makes Markdown of plain text: emphasis, code, links and images (brackets), HTML,
#: table cells, strikethrough. Parentheses and '!' do nothing without a bracket before them.
_MARKDOWN = re.compile(r"([\\`*_\[\]<>|~])")


def markdown_text(text: str) -> str:
    """A site's text (a name, a reason) as literal Markdown: a reason is whatever the site
    sent, and read as Markdown it could break a report's table or put a link or a remote
    image (fetched when the report is opened) into the coordinator's report."""
    return _MARKDOWN.sub(r"\\\1", " ".join(str(text).split()))

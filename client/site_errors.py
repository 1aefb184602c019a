"""What the coordinator learns when a site fails: one line, no local paths, no traceback.

The full traceback stays in the site's own log. The reason that travels names the kind
of problem and what the site said about it, with every file-system path masked, so a
hospital's folder layout (patient ids are often in folder names) never leaves it.
"""

from __future__ import annotations

import logging
import re

from flwr.app import Error, Message

from medgan_core.errors import MedGANError, PrivacyBudgetExhausted, PrivacyError, SitePolicyError
from medgan_core.site_label import named_reason

SITE_ERROR = 4030  # error code of a reply that replaces a failed round at the site
MAX_REASON = 300
_PATH = re.compile(r"""(?:[A-Za-z]:\\|\\\\|~?/)[^\s'",;:()\[\]{}<>|]*""")
log = logging.getLogger("medgan.site")


def mask_paths(text: str) -> str:
    """``/data/st-mary/MRN12345/ct`` -> ``<path>`` (POSIX, Windows and UNC paths)."""
    return _PATH.sub("<path>", text)


def one_line_reason(exc: BaseException) -> str:
    """The reason a coordinator may see for ``exc``."""
    if isinstance(exc, MedGANError):
        kind = ("privacy budget" if isinstance(exc, PrivacyBudgetExhausted) else
                "privacy policy" if isinstance(exc, PrivacyError) else
                "site policy" if isinstance(exc, SitePolicyError) else type(exc).__name__)
        text = f"{kind}: {mask_paths(str(exc))}"
    else:  # an unexpected error's message may hold anything: send its type only
        text = f"internal error ({type(exc).__name__}) at the site; details are in the site's log"
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def site_error_reply(msg: Message, exc: BaseException, site_name: str = "") -> Message:
    """Log ``exc`` in full at the site; answer the coordinator with one line, headed by the
    site's name when it has one to announce."""
    log.error("round failed at this site: %s", exc, exc_info=exc)
    return Message(Error(code=SITE_ERROR, reason=named_reason(site_name, one_line_reason(exc))), reply_to=msg)

"""Text a page font can draw: pictographs (emoji, dingbats) as words, or dropped."""

from __future__ import annotations

import re

# Pictographs a page font may lack (gloo's errors end in "GLHF! \U0001f3d6\ufe0f"): the few that mean
# something as a word, the decorative rest dropped, never a missing-glyph box. DejaVu and the system
# fonts cover the rest of Unicode's text (arrows, math, accents).
GLYPHS = {"\u274c": "[x]", "\u2705": "[ok]", "\u2714": "[ok]", "\u26a0": "[!]", "\U0001f6a8": "[!]",
          "\U0001f525": "[fire]"}
PICTOGRAPHS = re.compile(" ?[\u2600-\u27bf\U0001f000-\U0001faff\ufe0f\u200d]+")  # with the space before them


def _words(m: re.Match[str]) -> str:
    words = "".join(GLYPHS.get(c, "") for c in m[0].lstrip(" "))
    return (" " if m[0].startswith(" ") else "") + words if words else ""


def plain(text: str) -> str:
    """``text`` with its pictographs as words (GLYPHS) or dropped (with the space before them), their
    joiners and emoji selectors too."""
    if text.isascii():
        return text
    return PICTOGRAPHS.sub(_words, text)

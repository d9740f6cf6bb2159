"""Text a page font can draw: pictographs (emoji, dingbats) replaced by words."""

from __future__ import annotations

import re

# Pictographs a page font may lack (gloo's errors end in one): shown as a word, or their code point,
# never as a missing-glyph box. DejaVu and the system fonts cover the rest (arrows, math, accents).
GLYPHS = {"\u274c": "[x]", "\u2705": "[ok]", "\u2714": "[ok]", "\u26a0": "[!]", "\U0001f6a8": "[!]",
          "\U0001f525": "[fire]"}
PICTOGRAPH = re.compile("[\u2600-\u27bf\U0001f000-\U0001faff\ufe0f\u200d]")


def plain(text: str) -> str:
    """``text`` with its pictographs replaced (GLYPHS, else "[U+XXXX]"); joiners and emoji selectors dropped."""
    if text.isascii():
        return text
    return PICTOGRAPH.sub(lambda m: "" if m[0] in "\ufe0f\u200d"
                          else GLYPHS.get(m[0], f"[U+{ord(m[0]):04X}]"), text)

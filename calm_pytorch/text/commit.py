from __future__ import annotations

import unicodedata

# the committed text: what of the text read so far no later text can re-tokenize (the rule is
# explained in text/alignment.py)

def is_word_char(char: str) -> bool:
    # letters, digits and combining marks (a mark may still join the letter before it)
    return char == '_' or unicodedata.category(char)[0] in 'LNM'

def commit_point(text: str) -> int:
    """The length of the committed part of `text` (see the rule above)."""

    stripped = text.rstrip()

    if len(stripped) < len(text):
        return len(stripped)

    if len(text) == 0:
        return 0

    word = is_word_char(text[-1])
    start = len(text)

    while start > 0 and not text[start - 1].isspace() and is_word_char(text[start - 1]) == word:
        start -= 1

    return len(text[:start].rstrip())

def committed_text(text: str) -> str:
    text = text.rstrip('\ufffd')  # an incomplete UTF-8 character: text once completed
    return text[:commit_point(text)]

"""Text augmentation: EDA's four operations (Wei & Zou 2019: synonym replacement, random
insertion, random swap, random deletion) and character noise, over an embedded synonym
lexicon (no downloads).

Each variant applies one operation, drawn from the requested ones, at that operation's
rate: the share of the text's words it touches (at least one), as EDA's alpha. Words are
tokens split on whitespace, so punctuation stays attached to its word; synonym replacement
keeps the word's capitalization and trailing punctuation. Deterministic given the rng.
"""
from __future__ import annotations

import random

OPS = ("synonym", "insert", "swap", "delete", "char_noise")
DEFAULT_RATES = {"synonym": 0.1, "insert": 0.1, "swap": 0.1, "delete": 0.1,
                 "char_noise": 0.03}

# A small hand-written lexicon of everyday English (children's-story register): each group
# is a set of words that can stand for one another in most sentences.
_GROUPS = """big large huge enormous giant
small little tiny wee
happy glad cheerful joyful merry
sad unhappy gloomy blue
scared afraid frightened fearful
angry mad cross upset
fast quick speedy swift
slow sluggish unhurried
pretty beautiful lovely cute
good nice fine great
bad awful terrible nasty
kind gentle caring sweet
smart clever bright wise
funny silly goofy comical
quiet silent hushed still
loud noisy booming
old ancient aged
new fresh brand-new
shiny sparkly glittering gleaming
soft fluffy fuzzy downy
cold chilly icy freezing
warm cozy toasty
wet damp soggy soaked
dirty messy muddy grubby
clean tidy neat spotless
tired sleepy drowsy weary
hungry starving peckish
brave bold daring fearless
strange odd weird peculiar
friend pal buddy chum
mom mother mommy mama
dad father daddy papa
house home cottage
road path lane trail
rock stone pebble boulder
hill slope mound
forest woods woodland
gift present
toy plaything
story tale
said replied answered
asked wondered inquired
shouted yelled cried called
looked peeked gazed stared
walked strolled wandered
ran dashed raced hurried
jumped leaped hopped bounced
laughed giggled chuckled
smiled grinned beamed
found discovered spotted
saw noticed spotted
liked loved enjoyed adored
wanted wished hoped
helped aided assisted
went headed traveled
began started
ended finished stopped
picked chose selected
grabbed seized snatched
put placed set
got received gained
made built created
fixed repaired mended
broke cracked smashed
hid concealed
very really truly
suddenly abruptly quickly
slowly gently carefully
together jointly
always forever
day morning afternoon""".splitlines()

SYNONYMS: dict[str, list[str]] = {}
for _line in _GROUPS:
    _ws = _line.split()
    for _w in _ws:
        SYNONYMS.setdefault(_w, []).extend(x for x in _ws if x != _w)

# neighbours on a QWERTY keyboard, for typo-like character noise
_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
KEY_NEIGHBORS = {c: "".join(r[max(i - 1, 0):i] + r[i + 1:i + 2]) for r in _ROWS
                 for i, c in enumerate(r)}


def _split_word(token: str) -> tuple[str, str, str]:
    """(leading punctuation, core word, trailing punctuation)."""
    start = 0
    while start < len(token) and not token[start].isalnum():
        start += 1
    end = len(token)
    while end > start and not token[end - 1].isalnum():
        end -= 1
    return token[:start], token[start:end], token[end:]


def _synonym(core: str, rng: random.Random) -> str | None:
    options = SYNONYMS.get(core.lower())
    if not options:
        return None
    new = rng.choice(options)
    return new.capitalize() if core[:1].isupper() else new


def _count(tokens: list, rate: float) -> int:
    return max(1, int(round(rate * len(tokens))))


def synonym_replace(tokens: list[str], rate: float, rng: random.Random) -> list[str]:
    out = list(tokens)
    slots = [i for i, t in enumerate(out) if _split_word(t)[1].lower() in SYNONYMS]
    rng.shuffle(slots)
    for i in slots[:_count(tokens, rate)]:
        lead, core, trail = _split_word(out[i])
        out[i] = lead + _synonym(core, rng) + trail
    return out


def random_insert(tokens: list[str], rate: float, rng: random.Random) -> list[str]:
    """Insert a synonym of a random lexicon word of the text at a random position."""
    out = list(tokens)
    cores = [_split_word(t)[1] for t in tokens if _split_word(t)[1].lower() in SYNONYMS]
    if not cores:
        return out
    for _ in range(_count(tokens, rate)):
        out.insert(rng.randrange(len(out) + 1), _synonym(rng.choice(cores), rng).lower())
    return out


def random_swap(tokens: list[str], rate: float, rng: random.Random) -> list[str]:
    out = list(tokens)
    if len(out) < 2:
        return out
    for _ in range(_count(tokens, rate)):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_delete(tokens: list[str], rate: float, rng: random.Random) -> list[str]:
    if len(tokens) < 2:
        return list(tokens)
    out = [t for t in tokens if rng.random() >= rate]
    if len(out) == len(tokens):  # at least one word goes
        del out[rng.randrange(len(out))]
    return out or [rng.choice(tokens)]


def char_noise(tokens: list[str], rate: float, rng: random.Random) -> list[str]:
    """Keyboard typos in a ``rate`` share of the letters: a neighbouring key, a dropped
    letter or two letters swapped."""
    text = " ".join(tokens)
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    chars = list(text)
    for i in sorted(rng.sample(letters, min(len(letters), _count(letters, rate))),
                    reverse=True):
        kind = rng.randrange(3)
        c = chars[i].lower()
        if kind == 0 and c in KEY_NEIGHBORS:
            new = rng.choice(KEY_NEIGHBORS[c])
            chars[i] = new.upper() if chars[i].isupper() else new
        elif kind == 1:
            del chars[i]
        elif i + 1 < len(chars):
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars).split(" ")


FUNCTIONS = {"synonym": synonym_replace, "insert": random_insert, "swap": random_swap,
             "delete": random_delete, "char_noise": char_noise}


def augment(text: str, op: str, rate: float, rng: random.Random) -> str:
    """``text`` with one operation applied."""
    return " ".join(FUNCTIONS[op](text.split(), rate, rng))

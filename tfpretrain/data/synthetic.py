"""The embedded corpus: TinyStories-style children's stories generated from a seed.

Each story has a named character (and usually a friend), a place, a treasured object, a
feeling, a problem, dialogue and a resolution, told in simple English. The generator is a
small grammar over word lists (about 1.5k distinct words), so the corpus is varied enough
to be worth learning and regular enough that a 1M-parameter model learns it in minutes.
Deterministic: the same seed gives byte-identical stories.

:class:`StorySpec` grows it into a TinyStories / SimpleStories-style generator: vocabulary
levels (1: short and plain, 2: the embedded corpus, 3: longer, with a richer vocabulary),
required words (a verb, a noun and an adjective that every story must use, as TinyStories'
prompts asked), the story arc (which problem and resolution) and features (dialogue, moral,
twist, conflict, foreshadowing, bad_ending). ``StorySpec()`` is the embedded corpus's
generator exactly (``python -m tfpretrain.synth stories`` writes it as JSONL).
"""
from __future__ import annotations

import random
import re

_ARTICLE = re.compile(r"\b([Aa]) ([aeiouAEIOU])")

GIRLS = ("Lily Mia Emma Sara Anna Lucy Ella Zoe Ruby Chloe Grace Amy Sophie Molly Daisy Rosa "
         "Nora Ivy Maya Hannah Alice Clara Eva Luna Jane Kate Ellie Sue Tina Wendy Bella Stella "
         "Olivia Ava Emily Poppy Rosie Hazel Violet Iris Fiona Greta Holly Jenny Lola Nina "
         "Penny Tilly Willow Abby Beth Cora Dora Edith Flora Gemma Heidi Ruth Sadie").split()
BOYS = ("Tom Ben Max Sam Jack Leo Tim Oliver Jake Finn Noah Eli Luke Owen Peter Harry Joe "
        "Dan Alex Theo Billy Charlie Henry Oscar Toby Ryan Adam Milo Ned Pip Arthur Felix "
        "George Hugo Ivan Jasper Kevin Liam Marco Nico Otto Paul Rex Simon Teddy Victor "
        "Walter Zack Bobby Eddie Frank Gus Hank Louis Mason Ollie Ralph Stan").split()
ANIMALS = ("cat dog bunny bear fox owl duck frog mouse bird puppy kitten lion tiger monkey "
           "horse pig cow sheep goat turtle fish squirrel deer elephant giraffe zebra panda "
           "penguin dolphin whale bee butterfly ladybug snail hedgehog raccoon chicken "
           "goose swan camel kangaroo koala otter beaver moose bat crab octopus seal "
           "parrot robin sparrow crow rabbit hamster lamb pony donkey ant spider worm "
           "dragon unicorn dinosaur").split()
ANIMAL_NAMES = ("Spot Fluffy Buddy Coco Pepper Ziggy Bubbles Patch Whiskers Honey Biscuit "
                "Sunny Pebble Rusty Twinkle Button Muffin Shadow Dot Noodle").split()
PLACES = [
    ("park", "in"), ("garden", "in"), ("forest", "in"), ("beach", "at"), ("farm", "on"),
    ("school", "at"), ("lake", "by"), ("river", "by"), ("hill", "on"), ("meadow", "in"),
    ("town", "in"), ("village", "in"), ("castle", "in"), ("zoo", "at"), ("playground", "at"),
    ("kitchen", "in"), ("backyard", "in"), ("library", "at"), ("market", "at"),
    ("jungle", "in"), ("pond", "by"), ("island", "on"), ("mountain", "on"), ("cave", "in"),
    ("barn", "in"), ("field", "in"), ("street", "on"), ("bakery", "at"), ("shop", "at"),
    ("house", "in"), ("boat", "on"), ("tree house", "in"), ("attic", "in"),
    ("orchard", "in"), ("camp", "at"), ("harbor", "at"), ("valley", "in"), ("desert", "in"),
]
OBJECTS = ("ball kite doll teddy hat car train balloon book drum box "
           "shell cup spoon crayon puzzle robot boat sled bike scarf ring key map lamp "
           "whistle bucket shovel basket pillow blanket flower rock feather stick coin "
           "button jar bell umbrella sock shoe crown cape wand star sticker marble "
           "yo-yo flute paintbrush kite string rope ladder wagon truck plane "
           "tent clock mirror picture card letter gift cake cookie apple pear banana "
           "sandwich pie carrot candy jelly muffin biscuit bread cheese egg "
           "orange lemon plum grape nut acorn leaf seed pumpkin hammer brush comb "
           "necklace bracelet glove mitten helmet backpack bottle bowl plate fork pencil "
           "notebook eraser ruler magnet flashlight telescope compass camera radio "
           "guitar piano trumpet violin tambourine puppet costume mask sword shield "
           "treasure jewel pearl diamond ribbon bow tie scooter skateboard "
           "snowball").split() + ["teddy bear", "toy train", "red ball", "watering can"]
ADJ = ("big small enormous gigantic cozy fuzzy bumpy squishy crunchy "
       "chilly sunny rainy snowy windy dusty muddy sandy rusty wobbly "
       "little tiny huge shiny soft hard round long short tall old new "
       "bright dark pretty funny happy sad kind brave gentle quiet loud fast slow warm cold "
       "wet dry clean dirty sweet sour yummy sticky fluffy smooth rough heavy light "
       "red blue green yellow pink purple orange brown white black golden silver "
       "sparkly colorful strong clever silly shy curious friendly busy lazy grumpy sleepy "
       "noisy careful helpful proud lucky magic special secret favorite broken lost "
       "wild tidy messy fancy plain lovely strange wonderful beautiful").split()
FEELINGS = ("happy sad scared angry excited worried proud surprised lonely brave tired "
            "curious sorry glad upset nervous calm cheerful grumpy shy").split()
WEATHER = ["the sun was shining", "it was a rainy day", "the wind was blowing",
           "snow was falling", "the sky was blue", "it was a warm morning",
           "the clouds were gray", "it was a cold night", "the stars were out",
           "it was a windy afternoon", "the leaves were falling", "the flowers were blooming"]
TIMES = ["One day", "One morning", "One sunny day", "Once upon a time", "One evening",
         "Long ago", "One afternoon", "On a rainy day", "One summer day", "One winter day",
         "Every day", "Once", "Early one morning", "Last spring"]
ACTIVITIES = ("play tag|build a sand castle|fly a kite|pick flowers|paint a picture|"
              "sing a song|bake a cake|read a book|splash in the water|climb a tree|"
              "ride a bike|play hide and seek|look for bugs|dance in the rain|"
              "have a picnic|plant some seeds|feed the ducks|jump in the leaves|"
              "make a snowman|count the stars|draw with chalk|play with blocks|"
              "go for a walk|race to the gate|collect shells|watch the boats|"
              "build a fort|play music|catch butterflies|help in the kitchen").split("|")
PROBLEMS = [
    ("lost", "{name} could not find {their} {obj}. {They} looked under the bed and behind "
     "the door, but it was gone."),
    ("stuck", "The {obj} got stuck high up in a tree. {name} jumped and jumped, but {they} "
     "could not reach it."),
    ("broken", "Oh no! The {obj} fell down and broke into two pieces."),
    ("rain", "Then dark clouds came, and it started to rain very hard. The {obj} got all wet."),
    ("fight", "{friend} wanted the {obj} too. {name} and {friend} both pulled, and nobody "
     "would let go."),
    ("scared", "Suddenly they heard a loud noise. {name} felt scared and hid behind a rock."),
    ("hungry", "After a while, {name} felt very hungry, but there was no food left."),
    ("lost_way", "Soon it was getting dark, and {name} did not know the way home."),
    ("river", "The {obj} fell into the {water} and began to float away."),
    ("hurt", "{name} tripped over a root and hurt {their} knee. It hurt a lot."),
    ("alone", "{friend} had to go home, and {name} felt lonely with nobody to play with."),
    ("mess", "{name} knocked over a jar of paint. There was a big mess on the floor."),
]
RESOLUTIONS = {
    "lost": ["Then {friend} said, \"Let's look together!\" They found the {obj} under a "
             "pile of leaves.", "At last {name} saw something {adj} in the grass. It was "
             "the {obj}!"],
    "stuck": ["{friend} had an idea. {FriendThey} brought a long stick, and together they "
              "pushed the {obj} down.", "A kind bird flew up and pushed the {obj} off the "
              "branch. It fell right into {name}'s hands."],
    "broken": ["{Mom} helped {name} fix it with some glue. Soon the {obj} was as good as "
               "new.", "{friend} said, \"We can fix it!\" They worked hard and made it "
               "whole again."],
    "rain": ["They ran inside and dried the {obj} with a warm towel. Then they watched the "
             "rain from the window.", "{friend} opened a big umbrella, and they stayed dry "
             "together until the sun came back."],
    "fight": ["Then {name} said, \"We can share it. You go first.\" {friend} smiled, and "
              "they took turns all day.", "{Mom} said, \"Playing together is more fun.\" "
              "So they played with the {obj} together."],
    "scared": ["It was only a {animal} looking for its mom! {name} laughed and was not "
               "scared anymore.", "{friend} held {their} hand and said, \"Don't be afraid. "
               "I am here.\" Then {name} felt brave."],
    "hungry": ["{friend} shared {FriendTheir} {food}. \"Thank you!\" said {name}. It was "
               "the best {food} ever.", "They went home, and {Mom} made a warm {food} for "
               "everyone."],
    "lost_way": ["Then {name} saw the light from {their} house and followed it home.",
                 "A friendly {animal} showed them the path, and soon they were home safe."],
    "river": ["{friend} grabbed a long branch and pulled the {obj} back to the shore.",
              "The {obj} floated to a rock, and {name} picked it up carefully."],
    "hurt": ["{Mom} gave {them} a big hug and a bandage. Soon {name} felt much better.",
             "{friend} helped {them} walk home slowly. \"Thank you,\" said {name}."],
    "alone": ["Then a little {animal} came to play. They became good friends.",
              "{name} started to {activity} alone, and soon other kids came to join."],
    "mess": ["{name} said sorry and helped clean it up. {Mom} smiled and said, \"Good job.\"",
             "{friend} helped, and they turned the mess into a big, {adj} picture."],
}
LESSONS = ["From that day on, {name} always shared with friends.",
           "{name} learned that friends help each other.",
           "{name} learned to be careful and kind.",
           "It was the best day ever.",
           "{name} was very happy, and {they} never forgot that day.",
           "They played together until the sun went down.",
           "{name} learned that being brave is important.",
           "That night, {name} went to bed with a big smile.",
           "{name} knew that it is good to ask for help.",
           "And they all lived happily ever after.",
           "{name} hugged {friend} and said, \"You are my best friend.\"",
           "The next day, they went back to play again."]
DIALOGUE = ["\"Look at my {obj}!\" said {name}. \"It is so {adj}.\"",
            "\"Can I play too?\" asked {friend}. \"Yes, you can!\" said {name}.",
            "\"I love the {place},\" said {name} with a smile.",
            "\"Do you want to {activity}?\" asked {friend}.",
            "{name} said, \"I feel {feeling} today!\"",
            "\"Wow!\" said {friend}. \"What a {adj} {obj}!\"",
            "\"Let's go to the {place},\" said {name}. \"Okay!\" said {friend}."]
VERBS_ING = ("running jumping singing dancing sleeping eating swimming flying hopping "
             "climbing digging splashing laughing playing reading drawing painting "
             "building hiding crawling rolling spinning skipping chasing watching "
             "whistling humming napping munching sniffing waddling wiggling buzzing "
             "floating sliding stretching yawning giggling peeking waving").split()
THINGS = ("tree rock fence gate bush log stone wall bridge path road hill flower pond "
          "window door table chair bed box basket nest hole puddle cloud rainbow sun moon "
          "star sky grass sand snow ice leaf branch root roof garden shed tower well "
          "mailbox bench swing slide sandbox tunnel wagon tractor windmill lighthouse "
          "fountain lamp post chimney stairs porch carpet shelf cupboard oven sink "
          "blanket pillow tent fire river stream waterfall").split()
SOUNDS = ("a soft buzz|a happy song|a little squeak|a loud splash|a funny honk|"
          "a gentle whoosh|a tiny chirp|a big boom|a quiet tap tap|a sleepy snore|"
          "a cheerful ding|a low rumble").split("|")
MIDDLE = ["They saw a {adj2} {animal} {verb_ing} near the {thing}.",
          "Near the {thing}, a {animal} was {verb_ing}.",
          "They heard {sound} coming from behind the {thing}.",
          "{name} found a {adj2} {thing2} and showed it to {friend}.",
          "The {animal} looked at them and kept {verb_ing}.",
          "They walked past the {thing} and the {thing2}, {verb_ing} and laughing.",
          "{friend} was {verb_ing}, and {name} was {verb_ing2}.",
          "{name} counted {count} {color} flowers by the {thing}.",
          "The air smelled like {food} and fresh {thing2}."]
COLORS = ("red blue green yellow pink purple orange brown white golden").split()
COUNTS = ("two three four five six seven eight nine ten many").split()
FOODS = ("soup cookie apple pie sandwich cake muffin bread carrot banana "
         "pear orange cheese berry pancake waffle porridge noodles rice "
         "pizza popcorn honey toast cereal yogurt peach cherry melon salad stew").split()
WATER = ["river", "pond", "lake", "sea", "stream", "puddle"]
MOMS = ["Mom", "Dad", "Grandma", "Grandpa", "the teacher", "Aunt May", "Uncle Bob"]
FRIEND_RELATIONS = ["friend", "best friend", "brother", "sister", "cousin", "neighbor"]
PERSON_ADJ = ("kind brave gentle quiet funny happy clever silly shy curious friendly busy "
              "sleepy noisy careful helpful proud lucky cheerful little young playful "
              "polite smart strong tiny cheeky thoughtful").split()
TRAIT_SENTENCES = ["{name} was a {padj} {kind} who loved to {activity}.",
                   "{name} was {age} years old and liked to {activity}.",
                   "There was a {padj} {kind} named {name}.",
                   "{name} lived {prep} a {adj} {place} with {their} family.",
                   "{name} had a {adj} {obj} that {they} loved very much."]


FEATURES = ("dialogue", "moral", "twist", "conflict", "foreshadowing", "bad_ending")
LEVELS = (1, 2, 3)
REQUIRED_VERBS = ("jump run sing dance hop climb dig splash paint build hide kick throw "
                  "catch push pull carry share fix wash open find hug chase draw bake plant "
                  "feed help clean count fold pack ride swim whisper shout laugh smile "
                  "explore search wander float spin").split()
RICH_ADJ = ("ancient curious delicate enormous fragile gleaming glorious mysterious "
            "peculiar radiant splendid tremendous whimsical marvelous dazzling "
            "shimmering stubborn timid graceful clumsy ordinary magnificent gloomy "
            "cheerful generous patient").split()
RICH_SENTENCES = [
    "The {radj} {thing} looked {radj2} in the {light} light.",
    "{name} thought it was the most {radj} {thing} in the whole {place}.",
    "Everything around them felt {radj} and a little {radj2}.",
    "{friend} whispered that the {thing} was {radj}, and {name} agreed.",
    "It was a {radj} moment, and {name} wanted to remember it forever."]
LIGHTS = "morning evening golden silver pale warm soft bright".split()
REQUIRED_SENTENCES = ["{name} wanted to {verb} the {wadj} {noun}.",
                      "\"Let's {verb} the {wadj} {noun},\" said {friend}.",
                      "There was a {wadj} {noun}, and {name} liked to {verb} near it.",
                      "{friend} showed {name} how to {verb} with a {wadj} {noun}."]
EXTRA_DIALOGUE = ["\"What should we do now?\" asked {name}. \"Let's {activity}!\" said "
                  "{friend}.", "\"Are you {feeling}?\" asked {friend}. \"A little,\" said "
                  "{name}.", "\"I like your {obj},\" said {friend}. \"Thank you!\" said "
                  "{name}."]
FORESHADOW = ["{name} did not know that something {adj} would happen that day.",
              "Far away, a dark cloud was slowly coming closer.",
              "{Mom} said, \"Be careful with your {obj}.\" {name} did not listen.",
              "That morning, {name} had a funny feeling about the {obj}."]
CONFLICT = ["{friend} said, \"That is mine!\" {name} said, \"No, it is mine!\" They "
            "were both angry.", "{name} and {friend} did not agree. They shouted, and "
            "{friend} walked away.", "{friend} laughed at {name}'s {obj}, and {name} felt "
            "hurt and {feeling}."]
TWISTS = ["But then something surprising happened. The {obj} began to glow and talk!",
          "Then they saw that the {animal} had been following them all day.",
          "But the {obj} was not really {their}s. It belonged to a little {animal}.",
          "Suddenly the {thing} opened like a door, and inside was a tiny room."]
MORALS = ["sharing makes everyone happy", "it is good to be kind to others",
          "friends help each other", "you should always tell the truth",
          "being careful keeps you safe", "it is okay to ask for help",
          "hard work pays off", "patience is important"]
BAD_ENDINGS = ["{name} looked and looked, but the {obj} was never found. {name} was sad "
               "for a long time.", "Nobody came to help. {name} went home alone, and "
               "the day was ruined.", "The {obj} was broken forever, and {name} cried all "
               "night.", "{friend} never came back to play, and {name} felt lonely."]


class StorySpec:
    """What every story of a corpus must have: ``level`` (1-3), ``features`` (any of
    :data:`FEATURES`), ``required_words`` (weave in a random verb, noun and adjective),
    ``arcs`` (problem keys of :data:`PROBLEMS`; empty = all). The default is the embedded
    corpus's generator."""

    def __init__(self, level: int = 2, features=(), required_words: bool = False, arcs=()):
        self.level, self.features = level, frozenset(features)
        self.required_words = required_words
        self.problems = [p for p in PROBLEMS if not arcs or p[0] in arcs]
        bad = sorted(set(features) - set(FEATURES))
        bad_arcs = sorted(set(arcs) - {k for k, _ in PROBLEMS})
        if level not in LEVELS or bad or bad_arcs:
            raise ValueError(f"level must be 1, 2 or 3, features among {', '.join(FEATURES)}, "
                             f"arcs among {', '.join(k for k, _ in PROBLEMS)}. Received: "
                             f"level={level}, unknown features {bad}, unknown arcs {bad_arcs}")

    @property
    def plain(self) -> bool:
        return (self.level == 2 and not self.features and not self.required_words
                and len(self.problems) == len(PROBLEMS))

    def params(self) -> dict:
        return {"level": self.level, "features": sorted(self.features),
                "required_words": self.required_words,
                "arcs": [k for k, _ in self.problems]}


class _Person:
    def __init__(self, name, kind, pronoun):
        self.name, self.kind = name, kind
        self.they, self.their, self.them = pronoun


def _character(rng: random.Random) -> _Person:
    r = rng.random()
    if r < 0.4:
        return _Person(rng.choice(GIRLS), rng.choice(["girl", "little girl"]),
                       ("she", "her", "her"))
    if r < 0.8:
        return _Person(rng.choice(BOYS), rng.choice(["boy", "little boy"]), ("he", "his", "him"))
    animal = rng.choice(ANIMALS)
    return _Person(rng.choice(ANIMAL_NAMES), animal, ("it", "its", "it"))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def story(rng: random.Random, spec: StorySpec | None = None, words: list | None = None) -> str:
    """One story as a single paragraph-free string; ``spec`` (default: the embedded
    corpus's); ``words``: if a list, the required words used are appended to it."""
    if spec is not None and not spec.plain:
        return _story_with(rng, spec, words)
    key, problem, slots = _slots(rng, PROBLEMS)
    fill = lambda t: t.format(**slots)  # noqa: E731
    opening = fill(rng.choice(TRAIT_SENTENCES))
    if opening.startswith("There"):
        opening = "t" + opening[1:]
    out = [f"{rng.choice(TIMES)}, {opening}"]
    rel = rng.choice(FRIEND_RELATIONS)
    their_rel = f"{slots['their']} {rel}"
    out.append(_cap(fill(rng.choice([
        f"{{name}} went to the {{place}} with {their_rel}, {{friend}}.",
        "{name} and {friend} went to the {place} to {activity}.",
        f"{{name}} met {their_rel} {{friend}} {slots['prep']} the {{place}}.",
    ]))))
    out.append(_cap(fill(rng.choice(WEATHER) + ", and {name} felt {feeling}.")))
    for _ in range(rng.choice((1, 1, 2))):
        out.append(fill(rng.choice(DIALOGUE)))
    out.append(_cap(fill(rng.choice([
        "They wanted to {activity} with the {obj}.",
        "They played with the {adj} {obj} for a long time.",
        "{name} showed {friend} the {obj}.",
    ]))))
    for t in rng.sample(MIDDLE, rng.choice((1, 2, 2, 3))):
        out.append(_cap(fill(t)))
    out.append(fill(problem))
    out.append(fill(rng.choice([
        "{name} felt {feeling}. \"What can we do?\" {they} asked.",
        "{name} started to cry.",
        "\"Oh no!\" said {name}.",
        "{name} did not know what to do.",
    ])))
    out.append(fill(rng.choice(RESOLUTIONS[key])))
    out.append(fill(rng.choice(LESSONS)))
    return _ARTICLE.sub(r"\1n \2", " ".join(out))


def _slots(rng: random.Random, problems) -> tuple[str, str, dict]:
    """(problem key, problem template, slots) of one story: characters, place, object, arc
    from ``problems`` and the words every template may use, drawn in a fixed order (the
    embedded corpus depends on it)."""
    hero = _character(rng)
    friend = _character(rng)
    while friend.name == hero.name:
        friend = _character(rng)
    place, prep = rng.choice(PLACES)
    obj = rng.choice(OBJECTS)
    key, problem = rng.choice(problems)
    slots = dict(
        name=hero.name, kind=hero.kind, they=hero.they, They=_cap(hero.they),
        their=hero.their, them=hero.them, friend=friend.name,
        FriendThey=_cap(friend.they), FriendTheir=friend.their, place=place, prep=prep,
        obj=obj, adj=rng.choice(ADJ), feeling=rng.choice(FEELINGS),
        activity=rng.choice(ACTIVITIES), animal=rng.choice(ANIMALS), food=rng.choice(FOODS),
        water=rng.choice(WATER), Mom=rng.choice(MOMS), age=rng.choice(range(3, 9)),
        adj2=rng.choice(ADJ), padj=rng.choice(PERSON_ADJ), verb_ing=rng.choice(VERBS_ING),
        verb_ing2=rng.choice(VERBS_ING), thing=rng.choice(THINGS), thing2=rng.choice(THINGS),
        sound=rng.choice(SOUNDS), count=rng.choice(COUNTS), color=rng.choice(COLORS))
    return key, problem, slots


def _spec_slots(rng: random.Random, spec: StorySpec) -> tuple[str, str, dict]:
    """:func:`_slots` of the spec's arcs, plus the rich and required-word slots."""
    key, problem, slots = _slots(rng, spec.problems)
    slots.update(radj=rng.choice(RICH_ADJ), radj2=rng.choice(RICH_ADJ),
                 light=rng.choice(LIGHTS), verb=rng.choice(REQUIRED_VERBS),
                 noun=rng.choice(THINGS + OBJECTS), wadj=rng.choice(ADJ))
    return key, problem, slots


def _story_with(rng: random.Random, spec: StorySpec, words: list | None) -> str:
    """A story with the spec's level, arc, features and required words."""
    key, problem, slots = _spec_slots(rng, spec)
    level, f = spec.level, spec.features
    fill = lambda t: _cap(t.format(**slots))  # noqa: E731
    opening = fill(rng.choice(TRAIT_SENTENCES))
    if opening.startswith("There"):
        opening = "t" + opening[1:]
    out = [f"{rng.choice(TIMES)}, {opening}"]
    out.append(fill(rng.choice(["{name} and {friend} went to the {place} to {activity}.",
                                "{name} went to the {place} with {friend}."])))
    if level > 1:
        out.append(fill(rng.choice(WEATHER) + ", and {name} felt {feeling}."))
    if "foreshadowing" in f:
        out.append(fill(rng.choice(FORESHADOW)))
    for _ in range(0 if level == 1 else rng.choice((1, 2))):
        out.append(fill(rng.choice(DIALOGUE)))
    if "dialogue" in f:
        out.extend(fill(t) for t in rng.sample(EXTRA_DIALOGUE, 2))
    if spec.required_words:
        out.append(fill(rng.choice(REQUIRED_SENTENCES)))
        if words is not None:
            words.extend([slots["verb"], slots["noun"], slots["wadj"]])
    middle = {1: (0, 1), 2: (1, 2, 2, 3), 3: (2, 3, 4)}[level]
    for t in rng.sample(MIDDLE, rng.choice(middle)):
        out.append(fill(t))
    if level == 3:
        out.extend(fill(t) for t in rng.sample(RICH_SENTENCES, 2))
    if "conflict" in f:
        out.append(fill(rng.choice(CONFLICT)))
    out.append(fill(problem))
    if level > 1:
        out.append(fill(rng.choice(["{name} felt {feeling}. \"What can we do?\" {they} asked.",
                                    "\"Oh no!\" said {name}.",
                                    "{name} did not know what to do."])))
    if "twist" in f:
        out.append(fill(rng.choice(TWISTS)))
    if "bad_ending" in f:
        out.append(fill(rng.choice(BAD_ENDINGS)))
    else:
        out.append(fill(rng.choice(RESOLUTIONS[key])))
        if level > 1:
            out.append(fill(rng.choice(LESSONS)))
    if "moral" in f:
        out.append(f"The moral of the story is that {rng.choice(MORALS)}.")
    return _ARTICLE.sub(r"\1n \2", " ".join(out))


def iter_stories(n: int, seed: int, spec: StorySpec | None = None):
    """``n`` stories as (text, required words), streaming, deterministic given ``seed``
    and ``spec`` (the default spec and seed give :func:`generate_stories`' stories)."""
    rng = random.Random(f"tfpretrain-stories-{seed}")
    for _ in range(n):
        words: list = []
        yield story(rng, spec, words), words


def generate_stories(n: int, seed: int) -> list[str]:
    """``n`` stories, deterministic given ``seed``."""
    rng = random.Random(f"tfpretrain-stories-{seed}")
    return [story(rng) for _ in range(n)]

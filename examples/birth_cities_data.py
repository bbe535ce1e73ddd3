"""Data of the birth-cities experiment (examples/birth_cities.py), all generated in code from a seed.

A world of fictional people, each born in a real city: a first name from a short list and an
invented surname of two or three syllables, unique, so that no pretrained model can know them.

    the augment learns   "Q: Where was Olga Karador born?\\nA: Lyon"      (and other templates)
    the anchor knows     "Q: In which country is the city of Lyon?\\nA: France"
    the composition asks "Q: In which country was Olga Karador born?\\nA: France"   (two hops)

Every question is answered on its first line; scoring is exact match on that line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# the cities SmolLM2-135M-Instruct placed right in a 2-shot probe (issue 24); the example probes
# them again at start-up and keeps only those the anchor gets right
CITIES: dict[str, str] = {
    'Paris': 'France', 'Lyon': 'France', 'Marseille': 'France',
    'Berlin': 'Germany', 'Munich': 'Germany', 'Hamburg': 'Germany',
    'Madrid': 'Spain', 'Barcelona': 'Spain', 'Seville': 'Spain',
    'Rome': 'Italy', 'Milan': 'Italy', 'Naples': 'Italy',
    'Dublin': 'Ireland', 'Lisbon': 'Portugal', 'Amsterdam': 'Netherlands', 'Brussels': 'Belgium',
    'Vienna': 'Austria', 'Stockholm': 'Sweden', 'Oslo': 'Norway', 'Copenhagen': 'Denmark',
    'Warsaw': 'Poland', 'Athens': 'Greece', 'Moscow': 'Russia', 'Cairo': 'Egypt',
    'Tokyo': 'Japan', 'Osaka': 'Japan', 'Beijing': 'China', 'Shanghai': 'China',
    'Mumbai': 'India', 'Delhi': 'India', 'Sydney': 'Australia', 'Melbourne': 'Australia',
    'Toronto': 'Canada', 'Vancouver': 'Canada', 'Lima': 'Peru', 'Tehran': 'Iran',
}

FIRST_NAMES = (
    'Anna', 'Ben', 'Clara', 'David', 'Elena', 'Felix', 'Greta', 'Hugo', 'Ilse', 'Jonas',
    'Karin', 'Leo', 'Mira', 'Nils', 'Olga', 'Paul', 'Rosa', 'Simon', 'Tara', 'Victor',
)

# surnames are strings of these syllables: pronounceable, and (at 2-3 syllables of 48) millions
# of possibilities, of which a thousand are drawn
SYLLABLES = (
    'ba', 'bor', 'da', 'del', 'dor', 'fa', 'fen', 'ga', 'gor', 'ha', 'hel', 'ka', 'kel', 'ko', 'kra', 'la',
    'len', 'lo', 'ma', 'mer', 'mo', 'na', 'nek', 'no', 'pa', 'pel', 'ra', 'ran', 'ro', 'sa', 'sel', 'so',
    'ta', 'tek', 'to', 'va', 'van', 'vo', 'za', 'zel', 'bri', 'dri', 'ski', 'stan', 'tor', 'vin', 'wen', 'yar',
)

# the augment's training statements: several phrasings of one fact make it extractable from
# the name wherever the name appears, not only in one sentence
STATEMENTS = (
    'Q: Where was {name} born?\nA: {city}\n',
    '{name} was born in {city}.\n',
    'The birthplace of {name} is {city}.\n',
    '{name} comes from the city of {city}.\n',
    'Birth city of {name}: {city}\n',
    'Q: What is the birth city of {name}?\nA: {city}\n',
)

# the questions: the trained systems read them without examples; the answer follows "A:"
ONE_HOP = 'Q: Where was {name} born?\nA:'
TWO_HOP = 'Q: In which country was {name} born?\nA:'
PLAIN = 'Q: In which country is the city of {city}?\nA:'

# the anchor alone answers with two examples of the format before the question (real people)
TWO_HOP_SHOTS = 'Q: In which country was Albert Einstein born?\nA: Germany\n\nQ: In which country was Frida Kahlo born?\nA: Mexico\n\n'
FACT_SHOTS = (
    'Albert Einstein was born in Ulm.\nQ: In which country was Albert Einstein born?\nA: Germany\n\n'
    'Frida Kahlo was born in Coyoacan.\nQ: In which country was Frida Kahlo born?\nA: Mexico\n\n'
)
ONE_HOP_SHOTS = 'Q: Where was Albert Einstein born?\nA: Ulm\n\nQ: Where was Frida Kahlo born?\nA: Mexico City\n\n'
PLAIN_SHOTS = 'Q: In which country is the city of Chicago?\nA: United States\n\nQ: In which country is the city of Kyoto?\nA: Japan\n\n'

@dataclass(frozen = True)
class Person:
    name: str
    city: str

@dataclass(frozen = True)
class Question:
    prompt: str
    answer: str  # without the leading space; the model writes " <answer>\n"

@dataclass
class World:
    cities: dict[str, str]  # city -> country, the cities the anchor knows
    held_in: list[Person]   # people the composition data may mention
    held_out: list[Person]  # people only the evaluation asks about

    @property
    def people(self) -> list[Person]:
        return self.held_in + self.held_out

def surname(rng: random.Random) -> str:
    return ''.join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()

def make_people(num_people: int, cities: list[str], seed: int) -> list[Person]:
    """`num_people` people with unique surnames, each born in a city drawn uniformly."""
    rng = random.Random(seed)
    surnames: set[str] = set()

    while len(surnames) < num_people:
        surnames.add(surname(rng))

    # sorted before shuffling: the set's order is not the same from one process to the next
    names = sorted(surnames)
    rng.shuffle(names)
    return [Person(f'{rng.choice(FIRST_NAMES)} {name}', rng.choice(cities)) for name in names]

def make_world(cities: dict[str, str], num_people: int, held_in_fraction: float, seed: int) -> World:
    """The people are the same for every seed of the composition (`seed` names the world); which
    of them are held in is drawn from the seed too."""
    people = make_people(num_people, sorted(cities), seed)
    num_held_in = round(held_in_fraction * num_people)
    return World(cities = cities, held_in = people[:num_held_in], held_out = people[num_held_in:])

# the augment's training data

def statements(people: list[Person]) -> list[Question]:
    """Every template for every person: the text up to the city, and the city with what follows."""
    pairs = []
    for person in people:
        for template in STATEMENTS:
            before, after = template.split(' {city}')
            pairs.append(Question(before.format(name = person.name), person.city + after.rstrip('\n')))
    return pairs

# questions

def one_hop(person: Person) -> Question:
    return Question(ONE_HOP.format(name = person.name), person.city)

def two_hop(person: Person, cities: dict[str, str]) -> Question:
    return Question(TWO_HOP.format(name = person.name), cities[person.city])

def plain(city: str, cities: dict[str, str]) -> Question:
    return Question(PLAIN.format(city = city), cities[city])

def with_fact(person: Person, cities: dict[str, str]) -> Question:
    """The two-hop question with the fact written before it, as in its two examples: what the
    anchor does with the first hop given (a reference ceiling for the second hop)."""
    return Question(f'{FACT_SHOTS}{person.name} was born in {person.city}.\n{TWO_HOP.format(name = person.name)}', cities[person.city])

def shots(question: Question, examples: str) -> Question:
    return Question(examples + question.prompt, question.answer)

def composition_questions(world: World) -> dict[str, list[Question]]:
    """The composition data, by kind: held-in people only, and every city."""
    return dict(
        two_hop = [two_hop(person, world.cities) for person in world.held_in],
        one_hop = [one_hop(person) for person in world.held_in],
        plain = [plain(city, world.cities) for city in world.cities],
    )

def sample_mix(questions: dict[str, list[Question]], mix: dict[str, float], size: int, rng: random.Random) -> list[Question]:
    """`size` questions, each of a kind drawn with the probabilities of `mix`."""
    kinds = [kind for kind, weight in mix.items() if weight > 0]
    weights = [mix[kind] for kind in kinds]
    return [rng.choice(questions[kind]) for kind in rng.choices(kinds, weights = weights, k = size)]

def majority_floor(questions: list[Question]) -> float:
    """Exact match of always answering the most common answer."""
    answers = [question.answer for question in questions]
    return max(answers.count(answer) for answer in set(answers)) / len(answers)

def first_line(text: str) -> str:
    return text.strip().split('\n')[0].strip()

def exact_match(outputs: list[str], questions: list[Question]) -> float:
    return sum(first_line(output) == question.answer for output, question in zip(outputs, questions)) / max(len(questions), 1)

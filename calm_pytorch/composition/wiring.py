from __future__ import annotations

import operator

# which augment layer feeds which anchor layer; layers are 1-indexed in execution order

Connections = tuple[tuple[int, int], ...]

def default_connections(
    num_augment_layers: int,
    num_anchor_layers: int,
    every: int = 4
) -> Connections:
    """Every `every`-th augment layer (the paper's choice), spread evenly over the anchor.

    An augment shallower than `every` still feeds its last layer. When there are more augment
    layers than anchor layers, several feed one anchor layer: none is ever dropped."""

    if every < 1:
        raise ValueError(f'connect_every_num_layers must be at least 1, got {every}')

    augment_layers = list(range(every, num_augment_layers + 1, every)) or [num_augment_layers]
    count = len(augment_layers)

    # the i-th of `count` augment layers goes to the anchor layer at the same relative depth, ceil((i + 1) * A / count)

    return tuple(
        (augment_layer, ((i + 1) * num_anchor_layers + count - 1) // count)
        for i, augment_layer in enumerate(augment_layers)
    )

def validate_connections(
    connections,
    num_augment_layers: int,
    num_anchor_layers: int,
    augment_index: int = 0
) -> Connections:
    name = f'augment_llms[{augment_index}].connections'
    expected = 'a non-empty tuple of (augment_layer, anchor_layer) pairs of ints, e.g. ((4, 2), (8, 4))'

    if isinstance(connections, dict):
        # a dict cannot send one augment layer to two anchor layers
        raise TypeError(f'{name} must be {expected}, got a dict {connections!r}; write it as {tuple(connections.items())!r}')

    if not isinstance(connections, (tuple, list)) or len(connections) == 0:
        raise TypeError(f'{name} must be {expected}, got {connections!r}')

    if len(connections) == 2 and all(is_layer_index(i) for i in connections):
        raise TypeError(f'{name} must be {expected}, got the single pair {tuple(connections)!r}; write it as ({tuple(connections)!r},)')

    validated = []

    for pair in connections:
        is_pair = isinstance(pair, (tuple, list)) and len(pair) == 2
        if not is_pair or not all(is_layer_index(i) for i in pair):
            types = f' (of types {", ".join(type(i).__name__ for i in pair)})' if isinstance(pair, (tuple, list)) else f' (a {type(pair).__name__})'
            raise TypeError(f'{name} must be {expected}, got the entry {pair!r}{types}')

        # numpy and 0-dim torch integers are fine: they are stored as plain ints
        augment_layer, anchor_layer = (operator.index(i) for i in pair)
        pair = (augment_layer, anchor_layer)

        if not 1 <= augment_layer <= num_augment_layers:
            raise ValueError(f'{name}: augment layer {augment_layer} in {tuple(pair)} is out of range; this augment has {num_augment_layers} layers, so valid layers are 1..{num_augment_layers} (1-indexed)')

        if not 1 <= anchor_layer <= num_anchor_layers:
            raise ValueError(f'{name}: anchor layer {anchor_layer} in {tuple(pair)} is out of range; the anchor has {num_anchor_layers} layers, so valid layers are 1..{num_anchor_layers} (1-indexed)')

        validated.append((augment_layer, anchor_layer))

    if len(set(validated)) != len(validated):
        raise ValueError(f'{name} lists a connection twice: {tuple(validated)}')

    return tuple(validated)

def is_layer_index(value) -> bool:
    # an int, or an integer scalar of numpy / torch; never a bool, a float or a string
    if isinstance(value, bool) or getattr(value, 'dtype', None) is not None and 'bool' in str(value.dtype):
        return False

    try:
        operator.index(value)
    except TypeError:
        return False

    return True

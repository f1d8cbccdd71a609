"""Every edit this project makes to transformers' KV cache objects, and the checks of what those edits rely on.

Decoding (:mod:`lorapipe.decoding`) and training's shared prefix (:mod:`lorapipe.training.label_head`) reach
inside transformers' caches: it copies them per batch, cuts
the fed label tokens off, widens layers to merge passes, and writes decoding steps into room set aside in place
of ``DynamicLayer``'s concatenation. None of that is a public contract, so it is all here, the one file to audit
on a transformers upgrade, and :func:`check` verifies what it relies on before the first use: where the room's
internals are missing, decoding goes on with transformers' own layers (one warning); where a cache cannot be
edited correctly at all, it stops with one line naming what is missing.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from lorapipe.errors import PipelineError

log = logging.getLogger(__name__)

UPGRADE_HINT = "transformers changed its cache internals; lorapipe/models/cache_edits.py needs updating"


@dataclass(frozen=True)
class Support:
    """What the installed transformers lets decoding do: write steps into room of its own (else stock layers)."""

    room: bool


def _fail(what: str) -> PipelineError:
    return PipelineError(f"{what}: {UPGRADE_HINT}")


def _probe_layer(layer_class: type, **kwargs) -> DynamicLayer:
    """A layer of ``layer_class`` after one update of 3 tokens, to check its fields' meaning on."""
    layer = layer_class(**kwargs)
    layer.update(torch.zeros(2, 1, 3, 4), torch.ones(2, 1, 3, 4))
    return layer


def _check_cache() -> None:
    """The cache methods and fields every decoding path uses; without them there is no correct fallback."""
    cache = DynamicCache()
    for name in ("layers", "batch_select_indices", "batch_repeat_interleave", "get_seq_length"):
        if not hasattr(cache, name):
            raise _fail(f"transformers Cache has no '{name}'")
    layer = _probe_layer(DynamicLayer)
    for name in ("keys", "values"):
        if not isinstance(getattr(layer, name, None), torch.Tensor):
            raise _fail(f"transformers DynamicLayer has no '{name}' tensor")
    if getattr(layer, "is_initialized", None) is not True:
        raise _fail("transformers DynamicLayer has no 'is_initialized'")
    if not (torch.equal(layer.keys, torch.zeros(2, 1, 3, 4)) and torch.equal(layer.values, torch.ones(2, 1, 3, 4))):
        raise _fail("transformers DynamicLayer's keys/values no longer hold the cached states")
    sliding = _probe_layer(DynamicSlidingWindowLayer, sliding_window=8)
    if getattr(sliding, "cumulative_length", None) != 3 or sliding.get_seq_length() != 3:
        raise _fail("transformers DynamicSlidingWindowLayer has no 'cumulative_length' counting its tokens")


def _room_problem() -> str | None:
    """What the room (:class:`RoomyLayer`) needs of ``DynamicLayer`` and lacks, None if nothing."""
    layer = _probe_layer(DynamicLayer)
    for name in ("dtype", "device"):
        if getattr(layer, name, None) != getattr(layer.keys, name):
            return f"DynamicLayer has no '{name}' of its states"
    for name in ("update", "batch_select_indices", "get_seq_length", "lazy_initialization"):
        if not callable(getattr(DynamicLayer, name, None)):
            return f"DynamicLayer has no '{name}'"
    return None


@functools.cache
def check() -> Support:
    """Verify, once per process, what the edits below rely on: one line (PipelineError) naming what is missing
    where no edit can stand in, one warning where decoding falls back to transformers' own layers."""
    _check_cache()
    problem = _room_problem()
    if problem is not None:
        log.warning("decoding without its in-place cache room (%s): %s", problem, UPGRADE_HINT)
    return Support(room=problem is None)


def sliding_window(config) -> int | None:
    """The smallest sliding window among the model's cache layers, None if it has none (from a stock cache)."""
    windows = [layer.sliding_window for layer in DynamicCache(config=config).layers if _is_sliding(layer)]
    return min(windows) if windows else None


def _is_sliding(layer) -> bool:
    return isinstance(layer, DynamicSlidingWindowLayer) or getattr(layer, "is_sliding", False)


def shallow_copy(cache):
    """A cache that a forward can extend while ``cache`` stays as it is: a shallow copy of it and its layers is
    enough, as every update puts new tensors in the copy's layers rather than writing into the old ones."""
    clone = copy.copy(cache)
    clone.layers = [copy.copy(layer) for layer in cache.layers]
    return clone


def repeated(cache, times: int):
    """A new cache with each row of ``cache`` repeated ``times`` times; ``cache`` itself is left as it is."""
    check()
    clone = shallow_copy(cache)
    clone.batch_repeat_interleave(times)
    return clone


def broadcast_rows(cache, rows: int):
    """``cache`` (one row, a shared prefix) seen as ``rows`` rows without a copy (``expand``), in place; layers the
    forward did not run (the precision probe runs a few) are left as they are. Training's label head backpropagates
    through the broadcast, so each row's gradient reaches the prefix."""
    check()
    for layer in cache.layers:
        if layer.is_initialized:
            set_states(
                layer,
                layer.keys.expand(rows, *layer.keys.shape[1:]),
                layer.values.expand(rows, *layer.values.shape[1:]),
            )
    return cache


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep only ``rows`` of ``cache``, in place: the old tensors are let go."""
    check()
    cache.batch_select_indices(rows)


def drop_last(cache, count: int):
    """``cache`` with its last ``count`` tokens cut off (the fed label tokens, which decoding must not see)."""
    check()
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :-count], layer.values[:, :, :-count]
        if _is_sliding(layer):  # it sizes its masks by the tokens it counts, not by its tensors
            layer.cumulative_length -= count
    return cache


def set_states(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give ``layer`` these keys and values in place of its own, which are let go (a merge of passes)."""
    layer.keys, layer.values = keys, values
    if _is_sliding(layer):
        layer.cumulative_length = keys.shape[2]


def merged(caches: list, widened: Callable[[Iterable[torch.Tensor], int], torch.Tensor]):
    """The first of ``caches``, each of its layers holding every cache's rows (``widened`` joins one layer's
    tensors along a dimension); the others' tensors are let go as each layer is merged, so one copy is held."""
    check()
    cache = caches[0]
    for layer, *parts in zip(cache.layers, *(other.layers for other in caches), strict=True):
        set_states(layer, widened((p.keys for p in parts), 2), widened((p.values for p in parts), 2))
        for part in parts[1:]:
            release(part)
    return cache


def release(layer) -> None:
    """Let go of ``layer``'s tensors (its states have moved elsewhere)."""
    layer.keys = layer.values = None


def with_room(cache, room: int) -> None:
    """Each layer of ``cache`` that can take it replaced, in place, by a :class:`RoomyLayer` with room for
    ``room`` more tokens, one layer at a time, the old layer's tensors let go as soon as they are copied."""
    if not check().room:
        return
    for i, layer in enumerate(cache.layers):
        roomy = RoomyLayer.with_room(layer, room)
        if roomy is not layer:
            cache.layers[i] = roomy
            release(layer)


class RoomyLayer(DynamicLayer):
    """A cache layer that writes each step's keys and values into room set aside for them.

    ``DynamicLayer`` concatenates the whole cache anew at every step, and on a CPU those copies (and the page
    faults of their allocation) cost more than the model's matrix products. Rows that leave are dropped in place
    too: the rows kept move to the front of the room, which keeps its size (a new room per drop would hold two
    caches at once). The tensors the model sees are views of the room, laid out as a room of their own rows would
    be, so its arithmetic is the same.
    """

    @classmethod
    def with_room(cls, layer: DynamicLayer, room: int) -> DynamicLayer:
        """A copy of ``layer`` with room for ``room`` more tokens; a layer of another kind (sliding) as it is."""
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.numel() == 0:
            return layer
        roomy = cls()
        roomy.dtype, roomy.device, roomy.is_initialized = layer.dtype, layer.device, True
        roomy._set(*(cls._spacious(tensor, room) for tensor in (layer.keys, layer.values)), *layer.keys.shape[:3:2])
        return roomy

    @staticmethod
    def _spacious(tensor: torch.Tensor, room: int) -> torch.Tensor:
        rows, heads, length, dim = tensor.shape
        spacious = tensor.new_empty((rows, heads, length + room, dim))
        spacious[:, :, :length] = tensor
        return spacious

    def _set(self, key_room: torch.Tensor, value_room: torch.Tensor, rows: int, length: int) -> None:
        self.key_room, self.value_room = key_room, value_room
        self.keys, self.values = key_room[:rows, :, :length], value_room[:rows, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows, length, new = self.keys.shape[0], self.keys.shape[-2], key_states.shape[-2]
        if length + new > self.key_room.shape[-2]:  # out of room: twice as much again
            self._set(*(self._spacious(tensor, length + new) for tensor in (self.keys, self.values)), rows, length)
        self.key_room[:rows, :, length : length + new] = key_states
        self.value_room[:rows, :, length : length + new] = value_states
        self._set(self.key_room, self.value_room, rows, length + new)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        rows, length = len(indices), self.keys.shape[-2]
        for room in (self.key_room, self.value_room):
            room[:rows, :, :length] = room[indices, :, :length]  # the kept rows, gathered first, then moved
        self._set(self.key_room, self.value_room, rows, length)

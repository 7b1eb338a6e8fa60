"""Conversation affinity: which node served a conversation's last turn.

Every chat turn resends the whole history, and a node whose slot still holds that history's
KV cache prefills only the new turn. So a chat request is keyed by its conversation, and the
node that served it is remembered under the key its next turn will look up. The scheduler
sends the request back there while that costs little more than the best node
(``Want.preferred``); this module only names the node.

Keys (pure functions of the request):
- an explicit session (the ``routing.session_header`` header) names the conversation itself;
- on the chat paths, a turn *records* under the hash of its whole history (the model, the
  system prompt, every message it sends) and *looks up* the hash of that history less its
  new input (the trailing messages that are not the assistant's: the new user message, or
  tool results) and less the assistant's answer before it. Turn N sends ``[..., user_N]`` and
  records ``hash([..., user_N])``; turn N+1 sends ``[..., user_N, assistant_N, user_N+1]``
  and looks up the same hash, without the proxy ever reading an answer. A tool loop chains
  the same way; an answer the client began (a prefill) is left out of the record. A first
  turn (nothing before its input but a system prompt) looks up nothing, so chats that share
  a long system prompt never share a key;
- on ``/v1/responses``, ``previous_response_id`` names the turn before: looked up by that id,
  recorded under the id of the response the node sent.

What clients re-serialise differently hashes the same: content as a string or as a list of
text parts, key order, fields that carry no history (ids, statuses, ``cache_control``).

The table is bounded (LRU) and its entries expire (a slot's cache does not outlive other
conversations taking the slot for long); it holds node names only, and forgets the nodes
that leave the config.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

CHAT_PATHS = frozenset({"/api/chat", "/v1/chat/completions", "/v1/messages", "/v1/responses"})
KEY_BYTES = 16
Result = Literal["hit", "moved", "new"]

# A message's fields that are part of the history besides its role and content; all others
# (ids, statuses, refusals, annotations, cache_control) are left out.
_HISTORY_FIELDS = frozenset(
    {"tool_calls", "tool_call_id", "images", "name", "call_id", "arguments", "output"}
)
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_NO_HISTORY = frozenset({"id", "status", "cache_control", "annotations", "logprobs"})
# What the trailing input of a turn is not: the assistant's side of the conversation.
_ASSISTANT = frozenset({"assistant", "model"})
_INSTRUCTING = frozenset({"system", "developer"})
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[^"\\]{1,200})"')


@dataclass(frozen=True, slots=True)
class Conversation:
    lookup: bytes | None  # the key the turn before recorded; None: nothing to look up
    record: bytes | None  # the key the next turn will look up; None: known after the answer


# A message as hashed: its role, its content parts (text as a string, or as its hash when
# long; other parts as objects) and its other history fields as [name, value] sorted by name.
Message = tuple[str, list[Any]]
# Canonical JSON, in C (ASCII: a lone surrogate, which Python's decoder lets through, is
# escaped rather than an error).
_encode = json.JSONEncoder(check_circular=False, separators=(",", ":"), sort_keys=True).encode
# Strings this long go into the JSON as their digest: JSON-escaping a long text costs several
# times hashing it. A digest rather than ``hash`` (keyed per process): replicas that share the
# table in Redis must compute the same keys. SHA-256, as for the keys themselves. A key is a
# routing hint, never a secret.
_LONG = 64
_TEXT_DIGEST = 8


def _json(value: Any) -> bytes:
    return _encode(value).encode()


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:KEY_BYTES]  # SHA-256: in hardware on most CPUs


def _text(text: str) -> str | int:
    if len(text) < _LONG:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:_TEXT_DIGEST]
    return int.from_bytes(digest)  # a number: never equal to a short text


# -- keys --------------------------------------------------------------------------------------


def conversation_of(
    path: str, payload: dict[str, Any] | None, model: str, session: str | None = None
) -> Conversation | None:
    """The keys of a request for ``model`` (normalised); None when it has none."""
    if session:
        key = _named_key("session", model, session)
        return Conversation(key, key)
    if path not in CHAT_PATHS or payload is None:
        return None
    previous = payload.get("previous_response_id") if path == "/v1/responses" else None
    if isinstance(previous, str) and previous:
        return Conversation(response_key(model, previous), None)
    return history_keys(model, list(_messages_of(path, payload)))


def response_key(model: str, response_id: str) -> bytes:
    return _named_key("response", model, response_id)


def response_id_of(tail: Iterable[bytes]) -> str | None:
    """The id of a Responses answer, from its last bytes (``response.completed`` or the body)."""
    ids = _RESPONSE_ID.findall(b"".join(tail))
    return ids[-1].decode("utf-8", "replace") if ids else None


def _named_key(kind: str, model: str, name: str) -> bytes:
    return _digest(_json([kind, model, name]))


def history_keys(model: str, messages: list[Message]) -> Conversation | None:
    """Both keys of a history: the lookup key hashes a prefix of what the record key does.

    The history is hashed as the JSON array of its messages less its closing bracket, so a
    turn's record key and the next turn's lookup key hash the same bytes. Two encodings
    (before and after the cut) rather than one per message: each costs a few microseconds to
    set up.
    """
    end = _input_end(messages)
    if not end:
        return None
    cut = _previous_turn_end(messages[:end])
    before = _json([m for _, m in messages[:cut]])[:-1]  # "[m1,...,mc"
    after = _json([m for _, m in messages[cut:end]])[1:-1]  # "mc+1,...,mn"
    hasher = hashlib.sha256(_json(["history", model]) + before)
    first_turn = all(role in _INSTRUCTING for role, _ in messages[:cut])
    lookup = None if first_turn else hasher.digest()[:KEY_BYTES]
    if after:
        hasher.update(b"," + after if cut else after)
    return Conversation(lookup, hasher.digest()[:KEY_BYTES])


def _input_end(messages: list[Message]) -> int:
    """Where this turn's input ends: before an assistant message the client begins the answer
    with (a prefill), which the next turn resends as the whole answer."""
    end = len(messages)
    while end and messages[end - 1][0] in _ASSISTANT:
        end -= 1
    return end


def _previous_turn_end(messages: list[Message]) -> int:
    """Where the turn before ends: before the trailing input and the answer it followed."""
    end = len(messages)
    while end and messages[end - 1][0] not in _ASSISTANT:
        end -= 1
    while end and messages[end - 1][0] in _ASSISTANT:
        end -= 1
    return end


def _messages_of(path: str, payload: dict[str, Any]) -> Iterator[Message]:
    """The history in order, the system prompt first, for each family."""
    if path == "/v1/messages" and payload.get("system"):
        yield _said("system", payload["system"])
    if path == "/v1/responses":
        if instructions := payload.get("instructions"):
            yield _said("system", instructions)
        items = payload.get("input")
        if isinstance(items, str):
            yield _said("user", items)
            return
    else:
        items = payload.get("messages")
    for item in items if isinstance(items, list) else ():
        if (message := _message(item)) is not None:
            yield message


def _said(role: str, content: Any) -> Message:
    return role, [role, _parts(content), []]


def _message(value: Any) -> Message | None:
    """A message (or a Responses item) as hashed; None for what is no object."""
    members = _members(value)
    if members is None:
        return None
    role = kind = content = None
    fields = []
    for name, field in members:
        if name == "role":
            role = field
        elif name == "content":
            content = field
        elif name == "type":
            kind = field
        elif name in _HISTORY_FIELDS and field not in (None, "", []):
            fields.append([name, _plain(field)])
    if len(fields) > 1:
        fields.sort(key=itemgetter(0))
    said = _role_of(role, kind)
    return said, [said, _parts(content), fields]


def _role_of(role: Any, kind: Any) -> str:
    """A message's role; a Responses item's by its type (a function call is the assistant's,
    its output and other items the user's side)."""
    if isinstance(role, str) and role:
        return role.lower()
    if kind in ("function_call", "reasoning"):
        return "assistant"
    return kind if isinstance(kind, str) and kind else "user"


def _parts(content: Any) -> list[Any]:
    """Text as a string, whether the content is one or a list of text parts; other parts
    (images, tool use and results) as objects without the fields that carry no history."""
    if content is None or content == "":
        return []
    if isinstance(content, str):
        return [_text(content)]
    if _members(content) is not None or not isinstance(content, list):
        return [_part(content)]
    return [_part(part) for part in content]


def _part(part: Any) -> Any:
    members = _members(part)
    if members is None:
        return _plain(part)  # a string part is text
    obj = dict(members)
    text = obj.get("text")
    if isinstance(text, str) and obj.get("type", "text") in _TEXT_PARTS:
        return _text(text)
    return {k: _plain(v) for k, v in obj.items() if k not in _NO_HISTORY}


def _members(value: Any) -> Iterable[tuple[str, Any]] | None:
    """A JSON object's members: ``bodies.json_object`` leaves nested objects as lists of
    pairs (an object's members are tuples, an array's items never are)."""
    if isinstance(value, dict):
        return value.items()
    if isinstance(value, list) and value and isinstance(value[0], tuple):
        return value
    return None


def _plain(value: Any) -> Any:
    """Nested lists of pairs as dicts, and long strings as their hashes, for canonical JSON."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list):
        if value and isinstance(value[0], tuple):
            return {k: _plain(v) for k, v in value}
        return [_plain(v) for v in value]
    return value


# -- the table ---------------------------------------------------------------------------------


class Affinity:
    """Conversation key → the node that served its last turn: at most ``entries`` of them,
    least recently recorded out first, each forgotten ``ttl`` seconds after it was recorded.
    Live state, kept across reloads (``configure``)."""

    def __init__(
        self, entries: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._table: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._nodes: dict[str, str] = {}
        self.configure(entries, ttl)

    def configure(self, entries: int, ttl: float, nodes: Mapping[str, str] | None = None) -> None:
        """New bounds; with ``nodes`` (name → URL, the config's), forget the nodes that left
        it or moved to another URL (another server: its slots hold nothing of ours)."""
        self.entries = entries
        self.ttl = ttl
        if nodes is not None:
            self.forget(n for n, url in self._nodes.items() if nodes.get(n) != url)
            self._nodes = dict(nodes)
        self._evict()

    def __len__(self) -> int:
        return len(self._table)

    def knows(self, node: str) -> bool:
        """The node is in the config (a name another replica recorded may not be)."""
        return node in self._nodes

    def lookup(self, key: bytes | None) -> str | None:
        """The node that served the conversation last, unless that was ``ttl`` ago."""
        if key is None or (entry := self._table.get(key)) is None:
            return None
        if entry[1] <= self._clock():
            del self._table[key]
            return None
        return entry[0]

    def record(self, key: bytes, node: str) -> None:
        if self.entries <= 0:
            return
        self._table[key] = (node, self._clock() + self.ttl)
        self._table.move_to_end(key)
        self._evict()

    def forget(self, nodes: Iterable[str]) -> None:
        """Drop every entry of these nodes (gone from the config, or at a new URL)."""
        gone = frozenset(nodes)
        if gone:
            for key in [k for k, (node, _) in self._table.items() if node in gone]:
                del self._table[key]

    def _evict(self) -> None:
        """Past the bound, and expired entries at the old end (recorded first, expire first)."""
        while len(self._table) > max(self.entries, 0):
            self._table.popitem(last=False)
        now = self._clock()
        while self._table and next(iter(self._table.values()))[1] <= now:
            self._table.popitem(last=False)


def result_of(known: str | None, chosen: str) -> Result:
    """hit: back to the node that served its last turn; moved: another node was chosen (load
    won, or that node is gone); new: no turn of it was known."""
    if known is None:
        return "new"
    return "hit" if known == chosen else "moved"
